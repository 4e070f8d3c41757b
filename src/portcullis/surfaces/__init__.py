"""The APIs clients speak besides chat completions (OpenAI's Responses, Anthropic's Messages), each read into a
chat completions request on the way in and made from the chat answer on the way out (the exchange's surface)."""

from portcullis.errors import InvalidRequest


def invalid(message: str, param: str) -> InvalidRequest:
    """A 400 naming the field of the client's API that is wrong."""
    return InvalidRequest(message, param=param, code="invalid_value")
