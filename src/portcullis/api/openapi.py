"""`GET /openapi.json`: the gateway's OpenAPI 3.1 document.

Request bodies come from the same pydantic wire models that validate them (protocol.py, the admin and
batch models), so the document cannot drift from what is accepted; answers have hand-written schemas
of the fields clients rely on (extra fields allowed, as OpenAI's own answers grow). Every error, on every
route, has the one error shape (errors.py), declared as the `default` response. A test checks that every
route of the gateway is in the document, and a schemathesis run against a live gateway checks the
answers against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from portcullis.api.admin import NewKey, Rotation
from portcullis.api.batches import NewBatch
from portcullis.api.tenancy import Membership, NewOrganization, NewTeam, OrganizationChange
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModerationRequest

if TYPE_CHECKING:
    from portcullis.api.routes import Route


@dataclass(slots=True)
class OpenAPIDeps:
    openapi: bytes = b""  # the document, rendered once the route table it describes exists


_OBJECT: dict[str, Any] = {"type": "object"}
_STRING_OR_NULL: dict[str, Any] = {"type": ["string", "null"]}
SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": _STRING_OR_NULL,
                    "code": _STRING_OR_NULL,
                },
            }
        },
    },
    "AnthropicError": {
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "message"],
                    "properties": {
                        "index": {"type": "integer"},
                        "message": {"type": "object", "properties": {"role": {"type": "string"}}},
                        "finish_reason": _STRING_OR_NULL,
                    },
                },
            },
            "usage": _OBJECT,
        },
    },
    "Completion": {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "text_completion"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "required": ["index", "text"]}},
        },
    },
    "EmbeddingList": {
        "type": "object",
        "required": ["object", "data", "model"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object", "required": ["index", "embedding"]}},
            "model": {"type": "string"},
        },
    },
    "ModerationResult": {
        "type": "object",
        "required": ["id", "model", "results"],
        "properties": {
            "id": {"type": "string"},
            "model": {"type": "string"},
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["flagged", "categories", "category_scores"],
                    "properties": {
                        "flagged": {"type": "boolean"},
                        "categories": {"type": "object", "additionalProperties": {"type": "boolean"}},
                        "category_scores": {"type": "object", "additionalProperties": {"type": "number"}},
                    },
                },
            },
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"}},
    },
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
        },
    },
    "File": {
        "type": "object",
        "required": ["id", "object", "bytes", "filename", "purpose"],
        "properties": {"id": {"type": "string"}, "object": {"const": "file"}, "bytes": {"type": "integer"}},
    },
    "Batch": {
        "type": "object",
        "required": ["id", "object", "status", "request_counts"],
        "properties": {"id": {"type": "string"}, "object": {"const": "batch"}, "status": {"type": "string"}},
    },
    "List": {"type": "object", "required": ["object", "data"], "properties": {"object": {"const": "list"}}},
    "Object": _OBJECT,
    # The Responses API (OpenAI's document has the whole shapes; these are what the gateway checks)
    "ResponseRequest": {
        "type": "object",
        "required": ["model", "input"],
        "properties": {
            "model": {"type": "string"},
            "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
            "instructions": {"type": "string"},
            "stream": {"type": "boolean"},
            "store": {"type": "boolean"},
            "previous_response_id": {"type": "string"},
            "max_output_tokens": {"type": "integer"},
            "tools": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Response": {
        "type": "object",
        "required": ["id", "object", "created_at", "status", "model", "output"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "status": {"type": "string"},
            "output": {"type": "array", "items": {"type": "object"}},
        },
    },
    # Anthropic's Messages API
    "MessageRequest": {
        "type": "object",
        "required": ["model", "max_tokens", "messages"],
        "properties": {
            "model": {"type": "string"},
            "max_tokens": {"type": "integer", "minimum": 1},
            "messages": {"type": "array", "items": {"type": "object"}},
            "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
            "stream": {"type": "boolean"},
            "tools": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Message": {
        "type": "object",
        "required": ["id", "type", "role", "content", "model", "stop_reason", "usage"],
        "properties": {"id": {"type": "string"}, "type": {"const": "message"}, "content": {"type": "array"}},
    },
    "RerankRequest": {
        "type": "object",
        "required": ["model", "query", "documents"],
        "properties": {
            "model": {"type": "string"},
            "query": {"type": "string"},
            "documents": {"type": "array", "items": {"type": "string"}},
            "top_n": {"type": "integer", "minimum": 1},
        },
    },
    "LlamaCompletion": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            "model": {"type": "string"},
            "prompt": {"type": "string"},
            "n_predict": {"type": "integer"},
            "stream": {"type": "boolean"},
            "n_probs": {"type": "integer"},
        },
    },
    "LlamaInfill": {
        "type": "object",
        "required": ["model", "input_prefix", "input_suffix"],
        "properties": {
            "model": {"type": "string"},
            "input_prefix": {"type": "string"},
            "input_suffix": {"type": "string"},
            "n_predict": {"type": "integer"},
            "stream": {"type": "boolean"},
        },
    },
    "LlamaTokenize": {
        "type": "object",
        "required": ["model", "content"],
        "properties": {"model": {"type": "string"}, "content": {"type": "string"}, "with_pieces": {"type": "boolean"}},
    },
    "LlamaDetokenize": {
        "type": "object",
        "required": ["model", "tokens"],
        "properties": {"model": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer"}}},
    },
    "InputTokens": {
        "type": "object",
        "required": ["input_tokens"],
        "properties": {"input_tokens": {"type": "integer"}},
    },
}

_JSON = "application/json"


def _body(model: type[BaseModel] | None = None, *, schema: str | None = None, content: str = _JSON) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{model.__name__ if model else schema}"}
    return {"required": True, "content": {content: {"schema": ref}}}


def _ok(schema: str, *, status: str = "200", stream: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {_JSON: {"schema": {"$ref": f"#/components/schemas/{schema}"}}}
    if stream:
        # One server-sent event: `data` holds a JSON chunk, an error object (the stream then ends) or [DONE].
        content["text/event-stream"] = {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
            }
        }
    return {status: {"description": "OK", "content": content}}


def _op(
    summary: str,
    responses: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    params: list[str] = (),  # type: ignore[assignment]
    public: bool = False,
    anthropic: bool = False,
) -> dict[str, Any]:
    error = "AnthropicError" if anthropic else "Error"
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            **responses,
            "default": {
                "description": "An error, in Anthropic's shape" if anthropic else "An error, in OpenAI's shape",
                "content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{error}"}}},
            },
        },
    }
    if body is not None:
        op["requestBody"] = body
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
    if public:
        op["security"] = []
    return op


_TEXT = {"200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}}
_HTML = {"200": {"description": "A page", "content": {"text/html": {"schema": {"type": "string"}}}}}
_REDIRECT = {"303": {"description": "To the dashboard (a cookie set or cleared)"}}
_STATIC = {
    "200": {
        "description": "The dashboard's script or styles",
        "content": {kind: {"schema": {"type": "string"}} for kind in ("text/javascript", "text/css")},
    }
}
_LOGIN_FORM = {
    "required": True,
    "content": {
        "application/x-www-form-urlencoded": {
            "schema": {"type": "object", "properties": {"key": {"type": "string"}, "csrf": {"type": "string"}}}
        }
    },
}
_UPLOAD = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "purpose"],
                # The only fields taken (api/batches.py refuses any other): OpenAI's, expires_after as its SDK
                # sends it.
                "properties": {
                    "file": {"type": "string", "format": "binary"},
                    "purpose": {"type": "string", "enum": ["batch"]},
                    "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                    "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000},
                },
                "additionalProperties": False,
            }
        }
    },
}


def _examples(model: str, embed_model: str) -> dict[str, dict[str, Any]]:
    """A valid request per generating route, naming a model this gateway serves (clients and fuzzers start there)."""
    chat = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16}
    return {
        "/v1/chat/completions": chat,
        "/v1/completions": {"model": model, "prompt": "Once upon a time", "max_tokens": 16},
        "/v1/embeddings": {"model": embed_model, "input": "a sentence to embed"},
        "/v1/moderations": {"input": "a text to classify"},
    }


def document(routes: list[Route], version: str, models: list[str] | None = None) -> dict[str, Any]:
    """The document of the route table (api/routes.py): every route, and nothing the dispatcher does not serve."""
    schemas = dict(SCHEMAS)
    for model in (
        ChatCompletionRequest,
        CompletionRequest,
        EmbeddingRequest,
        ModerationRequest,
        NewKey,
        Rotation,
        NewBatch,
        NewOrganization,
        OrganizationChange,
        NewTeam,
        Membership,
    ):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = route.op
    if models:
        embed = next((m for m in models if "embed" in m), models[0])
        for path, example in _examples(models[0], embed).items():
            post = dict(paths[path]["post"])
            body = post["requestBody"]
            post["requestBody"] = {**body, "content": {_JSON: {**body["content"][_JSON], "example": example}}}
            paths[path]["post"] = post
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Portcullis",
            "version": version,
            "description": (
                "An OpenAI-compatible gateway for self-hosted LLM inference. The /v1 routes are also served "
                "without their /v1 prefix (for clients configured with a bare base URL)."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key or a JWT"}},
        },
        "security": [{"bearer": []}],
    }


async def serve(api: OpenAPIDeps, req: Request, ex: Exchange) -> None:
    await req.respond(200, api.openapi)
