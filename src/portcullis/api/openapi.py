"""`GET /openapi.json`: the gateway's OpenAPI 3.1 document.

Request bodies come from the same pydantic wire models that validate them (protocol.py, the admin and
batch models), so the document cannot drift from what is accepted; answers have hand-written schemas
of the fields clients rely on (extra fields allowed, as OpenAI's own answers grow). Every error, on every
route, has the one error shape (errors.py), declared as the `default` response. A test checks that every
route of the gateway is in the document, and a schemathesis run against a live gateway checks the
answers against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from portcullis.api.admin import NewKey, Rotation
from portcullis.api.batches import NewBatch
from portcullis.http import Request
from portcullis.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModerationRequest
from portcullis.upstream.exchange import Exchange

if TYPE_CHECKING:
    from portcullis.app import Gateway

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
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            **responses,
            "default": {
                "description": "An error, in OpenAI's shape",
                "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
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

PATHS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "post": _op("Create a chat completion", _ok("ChatCompletion", stream=True), body=_body(ChatCompletionRequest))
    },
    "/v1/completions": {
        "post": _op("Create a completion", _ok("Completion", stream=True), body=_body(CompletionRequest))
    },
    "/v1/embeddings": {"post": _op("Create embeddings", _ok("EmbeddingList"), body=_body(EmbeddingRequest))},
    "/v1/moderations": {"post": _op("Classify text", _ok("ModerationResult"), body=_body(ModerationRequest))},
    "/v1/models": {"get": _op("List models, routers and aliases", _ok("ModelList"))},
    "/v1/models/{model}": {
        "get": _op("Retrieve a model", _ok("Model"), params=["model"]),
        "delete": _op("Switch a model off", _ok("Object"), params=["model"]),
    },
    "/v1/files": {
        "post": _op("Upload a file", _ok("File"), body=_UPLOAD),
        "get": _op("List files", _ok("List")),
    },
    "/v1/files/{file_id}": {
        "get": _op("Retrieve a file", _ok("File"), params=["file_id"]),
        "delete": _op("Delete a file", _ok("Object"), params=["file_id"]),
    },
    "/v1/files/{file_id}/content": {
        "get": _op(
            "A file's content",
            # The handler serves the bytes as uploaded (JSONL) as application/octet-stream.
            {"200": {"description": "JSONL", "content": {"application/octet-stream": {"schema": {"type": "string"}}}}},
            params=["file_id"],
        )
    },
    "/v1/batches": {
        "post": _op("Create a batch", _ok("Batch"), body=_body(NewBatch)),
        "get": _op("List batches", _ok("List")),
    },
    "/v1/batches/{batch_id}": {"get": _op("Retrieve a batch", _ok("Batch"), params=["batch_id"])},
    "/v1/batches/{batch_id}/cancel": {"post": _op("Cancel a batch", _ok("Batch"), params=["batch_id"])},
    "/admin/keys": {
        "post": _op("Create an API key", _ok("Object", status="201"), body=_body(NewKey)),
        "get": _op("List API keys", _ok("Object")),
    },
    "/admin/keys/{key_id}": {
        "get": _op("Show an API key", _ok("Object"), params=["key_id"]),
        "delete": _op("Revoke an API key", _ok("Object"), params=["key_id"]),
    },
    "/admin/keys/{key_id}/revoke": {"post": _op("Revoke an API key", _ok("Object"), params=["key_id"])},
    "/admin/keys/{key_id}/rotate": {
        "post": _op(
            "Rotate an API key",
            _ok("Object", status="201"),
            params=["key_id"],
            body={"required": False, "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Rotation"}}}},
        )
    },
    "/admin/usage": {"get": _op("Usage report", _ok("Object"))},
    "/admin/backends": {"get": _op("Models, slots, queues and replicas", _ok("Object"))},
    "/admin/models": {"get": _op("Models and deployments with live state", _ok("Object"))},
    "/admin/models/{model}/enable": {"post": _op("Switch a model back on", _ok("Object"), params=["model"])},
    "/admin/route": {"post": _op("Explain a routing decision", _ok("Object"), body=_body(schema="Object"))},
    "/healthz": {"get": _op("The process is alive", _ok("Object"), public=True)},
    "/readyz": {
        "get": _op("The gateway can serve", {**_ok("Object"), "503": {"description": "Not ready"}}, public=True)
    },
    "/metrics": {"get": _op("Prometheus metrics", _TEXT)},
    "/openapi.json": {"get": _op("This document", _ok("Object"), public=True)},
    "/dashboard": {"get": _op("The operator dashboard, or its sign-in form", _HTML, public=True)},
    "/dashboard/login": {
        "post": _op(
            "Sign in to the dashboard",
            {
                **_REDIRECT,
                "401": {
                    "description": "The sign-in form again",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                },
            },
            body=_LOGIN_FORM,
            public=True,
        )
    },
    "/dashboard/logout": {"post": _op("Sign out of the dashboard", _REDIRECT, public=True)},
    "/dashboard/data": {"get": _op("What the dashboard shows", _ok("Object"), public=True)},
    "/dashboard/static/{name}": {
        "get": _op(
            "The dashboard's script and styles (its CSP allows nothing inline)", _STATIC, params=["name"], public=True
        )
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


def document(version: str, models: list[str] | None = None) -> dict[str, Any]:
    schemas = dict(SCHEMAS)
    for model in (
        ChatCompletionRequest,
        CompletionRequest,
        EmbeddingRequest,
        ModerationRequest,
        NewKey,
        Rotation,
        NewBatch,
    ):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    paths = PATHS
    if models:
        paths = {path: dict(ops) for path, ops in PATHS.items()}
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
            "description": "An OpenAI-compatible gateway for self-hosted LLM inference.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "An API key or a JWT"}},
        },
        "security": [{"bearer": []}],
    }


async def serve(gw: Gateway, req: Request, ex: Exchange) -> None:
    await req.respond(200, gw.openapi)
