"""OpenAI wire models for the requests the gateway validates.

They check what the gateway relies on and what a client most often gets wrong; they never drop
anything: every model allows extra fields, and the gateway forwards the client's own JSON (not a
re-serialisation of these models), so fields we do not know reach the upstream untouched.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    type: str

    @model_validator(mode="after")
    def _known_parts(self) -> ContentPart:
        extra = self.model_extra or {}
        if self.type == "text" and not isinstance(extra.get("text"), str):
            raise ValueError("a text part needs a string field 'text'")
        if self.type == "image_url":
            image = extra.get("image_url")
            if not isinstance(image, dict) or not isinstance(image.get("url"), str):
                raise ValueError("an image_url part needs 'image_url': {'url': ...}")
        return self


Content = str | list[ContentPart]


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _Message(_Open):
    name: str | None = None


class SystemMessage(_Message):
    role: Literal["system"]
    content: Content


class DeveloperMessage(_Message):
    role: Literal["developer"]
    content: Content


class UserMessage(_Message):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _says_something(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls and not (self.model_extra or {}).get("function_call"):
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


class FunctionMessage(_Message):
    """Deprecated by OpenAI, still sent by older clients."""

    role: Literal["function"]
    content: str | None
    name: str  # required here; optional on other messages


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]


class FunctionDef(_Open):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and not self.json_schema:
            raise ValueError("response_format of type json_schema needs 'json_schema'")
        return self


class StreamOptions(_Open):
    include_usage: bool | None = None


Stop = str | list[str] | None


# A model name is recorded with the request's usage before it is resolved (the usage of a 404 names what was
# asked), in a String(256) column (store/schema.py): a longer one failed the usage writer's INSERT, which held
# up every tenant's usage behind it (now it would be dropped there). A model configured under a longer name
# could not have had its usage written either.
MODEL_MAX_CHARS = 256


class _Sampling(_Open):
    model: str = Field(min_length=1, max_length=MODEL_MAX_CHARS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    # Lengths and counts are strict: an upstream reads "8" or 8.5 or true by rules of its own (llama-server
    # ignores a string), so a coerced value would be checked as one number and obeyed as another.
    n: StrictInt | None = Field(default=None, ge=1, le=128)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    stop: Stop = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


PromptInput = str | list[str] | list[int] | list[list[int]]


def prompt_count(prompt: PromptInput) -> int:
    """The prompts a completion request holds. llama-server (like OpenAI) answers each string of a list, or
    each list of token ids in a list, as a request of its own with its own `n` choices; a string or one
    list of token ids is one prompt."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


class CompletionRequest(_Sampling):
    prompt: PromptInput
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None
    best_of: StrictInt | None = Field(default=None, ge=1, le=128)


def _input_not_empty(value: Any) -> Any:
    if isinstance(value, list) and not value:
        raise ValueError("input must not be an empty list")
    return value


class EmbeddingRequest(_Open):
    model: str = Field(min_length=1, max_length=MODEL_MAX_CHARS)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    _not_empty = field_validator("input")(_input_not_empty)


class ModerationTextInput(_Open):
    type: Literal["text"]
    text: str


class ModerationImageInput(_Open):
    type: Literal["image_url"]
    image_url: dict[str, Any]


class ModerationRequest(_Open):
    input: str | list[str] | list[Annotated[ModerationTextInput | ModerationImageInput, Field(discriminator="type")]]
    model: str | None = None

    _not_empty = field_validator("input")(_input_not_empty)
