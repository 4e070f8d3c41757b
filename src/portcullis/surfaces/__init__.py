"""The APIs clients speak besides chat completions (OpenAI's Responses, Anthropic's Messages), each read into a
chat completions request on the way in and made from the chat answer on the way out (the exchange's surface)."""

from typing import Any

from portcullis.errors import InvalidRequest


def invalid(message: str, param: str) -> InvalidRequest:
    """A 400 naming the field of the client's API that is wrong."""
    return InvalidRequest(message, param=param, code="invalid_value")


def chat_tool(tool: dict[str, Any], parameters: Any) -> dict[str, Any]:
    """A function tool of another API (its `name`, `description`, `strict`) as chat completions declares it."""
    function: dict[str, Any] = {"name": tool["name"], "parameters": parameters or {"type": "object"}}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    if tool.get("strict") is not None:
        function["strict"] = bool(tool["strict"])
    return {"type": "function", "function": function}
