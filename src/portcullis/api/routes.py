"""The route table: every route once, with its method, path, handler, the scope it needs, how it is metered
and its OpenAPI operation. The dispatcher (app/dispatch.py) and `/openapi.json` are both made from it, so no route
can be served undocumented or documented unserved.

A path parameter matches what `PARAMS` says (the whole raw path is matched: see docs/operations.md);
the handler gets it decoded, as an extra positional argument.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from portcullis.api import admin, batches, console, dashboard, llama, openai, openapi, ops, surfaces, tenancy
from portcullis.api.openapi import _HTML, _LOGIN_FORM, _REDIRECT, _STATIC, _TEXT, _UPLOAD, _body, _ok, _op
from portcullis.identity import scopes
from portcullis.identity.auth import require_scope
from portcullis.identity.principal import Principal
from portcullis.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModerationRequest

Handler = Callable[..., Awaitable[None]]

# What each path parameter may be (ids are ours: their alphabet is known; a model name is anything).
PARAMS = {
    "model": r".+",
    "file_id": r"[A-Za-z0-9_-]+",
    "batch_id": r"[A-Za-z0-9_-]+",
    "response_id": r"[A-Za-z0-9_-]+",
    "slot": r"[0-9]+",
    "key_id": r"[0-9a-f]+",
    "org_id": r"org_[a-z0-9]+",
    "team_id": r"team_[a-z0-9]+",
    "user": r"[^/]+",  # (percent-encoded as needed: a user may be an e-mail address)
    "rest": r"[A-Za-z0-9_./%@+=-]+",  # the console's way to an admin route (api/console.py)
    "name": r"[a-z]+\.(?:js|css)",
}
_PARAM = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # as OpenAPI writes it: /v1/models/{model}
    handler: Handler
    deps: Any  # what the handler uses (its module's *Deps), passed as its first argument
    scope: str  # the one scope it needs (scopes.PUBLIC: none)
    op: dict[str, Any]  # its OpenAPI operation
    metered: bool = False  # settled against quotas, leaves a usage record
    quiet: bool = False  # no access-log line, request metrics or span (probes would drown the rest)
    anthropic: bool = False  # errors in Anthropic's shape (the Messages API)
    # A credential without `scope` but with roles:act may call it: the handler limits it to what the user's roles
    # reach (identity/roles.py).
    by_roles: bool = False

    def check(self, principal: Principal) -> None:
        """403 unless the principal holds the route's scope, or (a by_roles route) roles:act: the handler then limits
        it to what its roles reach. (The dispatcher's check, and the console's for the admin routes it calls.)"""
        if not (self.by_roles and scopes.ROLES in principal.scopes):
            require_scope(principal, self.scope)

    @property
    def pattern(self) -> re.Pattern[str] | None:
        """The regular expression of a path with parameters (None: a fixed path)."""
        if "{" not in self.path:
            return None
        return re.compile("^" + _PARAM.sub(lambda m: f"({PARAMS[m.group(1)]})", self.path) + "$")


def table(
    *,
    openai_deps: openai.OpenAIDeps,
    admin_deps: admin.AdminDeps,
    batches_deps: batches.BatchDeps,
    dashboard_deps: dashboard.DashboardDeps,
    ops_deps: ops.OpsDeps,
    openapi_deps: openapi.OpenAPIDeps,
    metrics_public: bool,
) -> list[Route]:
    metrics_scope = scopes.PUBLIC if metrics_public else scopes.ADMIN_READ
    key_body = {
        "required": False,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Rotation"}}},
    }
    file_content = {
        "200": {"description": "JSONL", "content": {"application/octet-stream": {"schema": {"type": "string"}}}}
    }
    ready = {**_ok("Object"), "503": {"description": "Not ready"}}
    login = {
        **_REDIRECT,
        "401": {"description": "The sign-in form again", "content": {"text/html": {"schema": {"type": "string"}}}},
    }
    return [
        # The OpenAI API
        Route(
            "POST",
            "/v1/chat/completions",
            openai.chat_completions,
            openai_deps,
            scopes.CHAT,
            _op("Create a chat completion", _ok("ChatCompletion", stream=True), body=_body(ChatCompletionRequest)),
            metered=True,
        ),
        Route(
            "POST",
            "/v1/completions",
            openai.completions,
            openai_deps,
            scopes.COMPLETIONS,
            _op("Create a completion", _ok("Completion", stream=True), body=_body(CompletionRequest)),
            metered=True,
        ),
        Route(
            "POST",
            "/v1/embeddings",
            openai.embeddings,
            openai_deps,
            scopes.EMBEDDINGS,
            _op("Create embeddings", _ok("EmbeddingList"), body=_body(EmbeddingRequest)),
            metered=True,
        ),
        Route(
            "POST",
            "/v1/moderations",
            openai.moderations,
            openai_deps,
            scopes.MODERATIONS,
            _op("Classify text", _ok("ModerationResult"), body=_body(ModerationRequest)),
            metered=True,
        ),
        # The Responses API (surfaces/responses.py)
        Route(
            "POST",
            "/v1/responses",
            surfaces.create_response,
            openai_deps,
            scopes.RESPONSES,
            _op("Create a response", _ok("Response", stream=True), body=_body(schema="ResponseRequest")),
            metered=True,
        ),
        Route(
            "POST",
            "/v1/responses/input_tokens",
            surfaces.count_response_tokens,
            openai_deps,
            scopes.TOKENS,
            _op("Count a response request's input tokens", _ok("InputTokens"), body=_body(schema="ResponseRequest")),
            metered=True,
        ),
        Route(
            "GET",
            "/v1/responses/{response_id}",
            surfaces.get_response,
            openai_deps,
            scopes.RESPONSES,
            _op("Retrieve a stored response", _ok("Response"), params=["response_id"]),
        ),
        Route(
            "DELETE",
            "/v1/responses/{response_id}",
            surfaces.delete_response,
            openai_deps,
            scopes.RESPONSES,
            _op("Delete a stored response", _ok("Object"), params=["response_id"]),
        ),
        Route(
            "GET",
            "/v1/responses/{response_id}/input_items",
            surfaces.list_input_items,
            openai_deps,
            scopes.RESPONSES,
            _op("A stored response's input items", _ok("List"), params=["response_id"]),
        ),
        Route(
            "POST",
            "/v1/chat/completions/input_tokens",
            surfaces.count_chat_tokens,
            openai_deps,
            scopes.TOKENS,
            _op("Count a chat request's input tokens", _ok("InputTokens"), body=_body(ChatCompletionRequest)),
            metered=True,
        ),
        # Anthropic's Messages API (surfaces/messages.py); its errors in Anthropic's shape
        Route(
            "POST",
            "/v1/messages",
            surfaces.create_message,
            openai_deps,
            scopes.MESSAGES,
            _op(
                "Create a message (Anthropic)",
                _ok("Message", stream=True),
                body=_body(schema="MessageRequest"),
                anthropic=True,
            ),
            metered=True,
            anthropic=True,
        ),
        Route(
            "POST",
            "/v1/messages/count_tokens",
            surfaces.count_message_tokens,
            openai_deps,
            scopes.TOKENS,
            _op(
                "Count a message request's input tokens (Anthropic)",
                _ok("InputTokens"),
                body=_body(schema="MessageRequest"),
                anthropic=True,
            ),
            metered=True,
            anthropic=True,
        ),
        Route(
            "POST",
            "/v1/rerank",
            llama.rerank,
            openai_deps,
            scopes.RERANK,
            _op("Rerank documents by relevance to a query", _ok("Object"), body=_body(schema="RerankRequest")),
            metered=True,
        ),
        # llama.cpp's own endpoints (api/llama.py)
        Route(
            "POST",
            "/completion",
            llama.completion,
            openai_deps,
            scopes.COMPLETIONS,
            _op("A completion in llama.cpp's shape", _ok("Object", stream=True), body=_body(schema="LlamaCompletion")),
            metered=True,
        ),
        Route(
            "POST",
            "/infill",
            llama.infill,
            openai_deps,
            scopes.COMPLETIONS,
            _op("Fill in the middle (code)", _ok("Object", stream=True), body=_body(schema="LlamaInfill")),
            metered=True,
        ),
        Route(
            "POST",
            "/tokenize",
            llama.tokenize,
            openai_deps,
            scopes.TOKENS,
            _op("Tokenize with the model's tokenizer", _ok("Object"), body=_body(schema="LlamaTokenize")),
            metered=True,
        ),
        Route(
            "POST",
            "/detokenize",
            llama.detokenize,
            openai_deps,
            scopes.TOKENS,
            _op("Token ids back to text", _ok("Object"), body=_body(schema="LlamaDetokenize")),
            metered=True,
        ),
        Route(
            "POST",
            "/apply-template",
            llama.apply_template,
            openai_deps,
            scopes.TOKENS,
            _op("The prompt the model's chat template makes", _ok("Object"), body=_body(ChatCompletionRequest)),
            metered=True,
        ),
        Route(
            "GET",
            "/props",
            llama.props,
            openai_deps,
            scopes.TOKENS,
            _op("A model's llama-server properties, as last probed (?model=)", _ok("Object")),
            metered=True,
        ),
        Route("POST", "/props", llama.blocked, openai_deps, scopes.ADMIN_READ, _op("Blocked", _ok("Object"))),
        Route("GET", "/slots", llama.blocked, openai_deps, scopes.ADMIN_READ, _op("Blocked", _ok("Object"))),
        Route(
            "POST",
            "/slots/{slot}",
            llama.blocked,
            openai_deps,
            scopes.ADMIN_READ,
            _op("Blocked", _ok("Object"), params=["slot"]),
        ),
        Route("GET", "/lora-adapters", llama.blocked, openai_deps, scopes.ADMIN_READ, _op("Blocked", _ok("Object"))),
        Route("POST", "/lora-adapters", llama.blocked, openai_deps, scopes.ADMIN_READ, _op("Blocked", _ok("Object"))),
        Route(
            "GET",
            "/v1/models",
            openai.list_models,
            openai_deps,
            scopes.MODELS_READ,
            _op("List models, routers and aliases", _ok("ModelList")),
        ),
        Route(
            "GET",
            "/v1/models/{model}",
            openai.get_model,
            openai_deps,
            scopes.MODELS_READ,
            _op("Retrieve a model", _ok("Model"), params=["model"]),
        ),
        Route(
            "DELETE",
            "/v1/models/{model}",
            openai.delete_model,
            openai_deps,
            scopes.MODELS_DELETE,
            _op("Switch a model off", _ok("Object"), params=["model"]),
        ),
        Route(
            "POST",
            "/v1/files",
            batches.upload_file,
            batches_deps,
            scopes.BATCHES,
            _op("Upload a file", _ok("File"), body=_UPLOAD),
        ),
        Route("GET", "/v1/files", batches.list_files, batches_deps, scopes.BATCHES, _op("List files", _ok("List"))),
        Route(
            "GET",
            "/v1/files/{file_id}",
            batches.get_file,
            batches_deps,
            scopes.BATCHES,
            _op("Retrieve a file", _ok("File"), params=["file_id"]),
        ),
        Route(
            "DELETE",
            "/v1/files/{file_id}",
            batches.delete_file,
            batches_deps,
            scopes.BATCHES,
            _op("Delete a file", _ok("Object"), params=["file_id"]),
        ),
        # The handler serves the bytes as uploaded (JSONL) as application/octet-stream.
        Route(
            "GET",
            "/v1/files/{file_id}/content",
            batches.file_content,
            batches_deps,
            scopes.BATCHES,
            _op("A file's content", file_content, params=["file_id"]),
        ),
        Route(
            "POST",
            "/v1/batches",
            batches.create_batch,
            batches_deps,
            scopes.BATCHES,
            _op("Create a batch", _ok("Batch"), body=_body(batches.NewBatch)),
        ),
        Route(
            "GET", "/v1/batches", batches.list_batches, batches_deps, scopes.BATCHES, _op("List batches", _ok("List"))
        ),
        Route(
            "GET",
            "/v1/batches/{batch_id}",
            batches.get_batch,
            batches_deps,
            scopes.BATCHES,
            _op("Retrieve a batch", _ok("Batch"), params=["batch_id"]),
        ),
        Route(
            "POST",
            "/v1/batches/{batch_id}/cancel",
            batches.cancel_batch,
            batches_deps,
            scopes.BATCHES,
            _op("Cancel a batch", _ok("Batch"), params=["batch_id"]),
        ),
        # Administration
        Route(
            "POST",
            "/admin/keys",
            admin.create_key,
            admin_deps,
            scopes.KEYS_ADMIN,
            _op("Create an API key", _ok("Object", status="201"), body=_body(admin.NewKey)),
            by_roles=True,
        ),
        Route(
            "GET",
            "/admin/keys",
            admin.list_keys,
            admin_deps,
            scopes.KEYS_ADMIN,
            _op("List API keys", _ok("Object")),
            by_roles=True,
        ),
        Route(
            "GET",
            "/admin/keys/{key_id}",
            admin.show_key,
            admin_deps,
            scopes.KEYS_ADMIN,
            _op("Show an API key", _ok("Object"), params=["key_id"]),
            by_roles=True,
        ),
        Route(
            "DELETE",
            "/admin/keys/{key_id}",
            admin.revoke_key,
            admin_deps,
            scopes.KEYS_ADMIN,
            _op("Revoke an API key", _ok("Object"), params=["key_id"]),
            by_roles=True,
        ),
        Route(
            "POST",
            "/admin/keys/{key_id}/revoke",
            admin.revoke_key,
            admin_deps,
            scopes.KEYS_ADMIN,
            _op("Revoke an API key", _ok("Object"), params=["key_id"]),
            by_roles=True,
        ),
        Route(
            "POST",
            "/admin/keys/{key_id}/rotate",
            admin.rotate_key,
            admin_deps,
            scopes.KEYS_ADMIN,
            _op("Rotate an API key", _ok("Object", status="201"), params=["key_id"], body=key_body),
            by_roles=True,
        ),
        Route(
            "GET",
            "/admin/usage",
            admin.usage_report,
            admin_deps,
            scopes.USAGE,
            _op("Usage report", _ok("Object")),
            by_roles=True,
        ),
        Route(
            "GET",
            "/admin/budgets",
            admin.budgets,
            admin_deps,
            scopes.USAGE,
            _op("Budgets of organisations, teams and keys: spent so far, forecast", _ok("Object")),
            by_roles=True,
        ),
        Route(
            "GET",
            "/admin/backends",
            admin.backends,
            admin_deps,
            scopes.ADMIN_READ,
            _op("Models, slots, queues and replicas", _ok("Object")),
        ),
        Route(
            "GET",
            "/admin/hosts",
            admin.hosts,
            admin_deps,
            scopes.ADMIN_READ,
            _op("Hosts that load models on demand: each model's state, queue, load time; swaps", _ok("Object")),
        ),
        Route(
            "GET",
            "/admin/models",
            admin.models,
            admin_deps,
            scopes.ADMIN_READ,
            _op("Models and deployments with live state", _ok("Object")),
        ),
        Route(
            "POST",
            "/admin/models/{model}/enable",
            admin.enable_model,
            admin_deps,
            scopes.MODELS_WRITE,
            _op("Switch a model back on", _ok("Object"), params=["model"]),
        ),
        # Organisations, teams, members (api/tenancy.py)
        Route(
            "POST",
            "/admin/organizations",
            tenancy.create_org,
            admin_deps,
            scopes.ORGS_ADMIN,
            _op("Create an organisation", _ok("Object", status="201"), body=_body(tenancy.NewOrganization)),
        ),
        Route(
            "GET",
            "/admin/organizations",
            tenancy.list_orgs,
            admin_deps,
            scopes.ADMIN_READ,
            _op("List organisations", _ok("Object")),
            by_roles=True,
        ),
        Route(
            "GET",
            "/admin/organizations/{org_id}",
            tenancy.show_org,
            admin_deps,
            scopes.ADMIN_READ,
            _op("An organisation and its teams", _ok("Object"), params=["org_id"]),
            by_roles=True,
        ),
        Route(
            "POST",
            "/admin/organizations/{org_id}",
            tenancy.change_org,
            admin_deps,
            scopes.ORGS_ADMIN,
            _op(
                "Change an organisation",
                _ok("Object"),
                params=["org_id"],
                body=_body(tenancy.OrganizationChange),
            ),
        ),
        Route(
            "GET",
            "/admin/organizations/{org_id}/members",
            tenancy.org_members,
            admin_deps,
            scopes.ADMIN_READ,
            _op("Everyone with a role in an organisation or its teams", _ok("Object"), params=["org_id"]),
            by_roles=True,
        ),
        Route(
            "POST",
            "/admin/organizations/{org_id}/members",
            tenancy.set_org_member,
            admin_deps,
            scopes.ORGS_ADMIN,
            _op(
                "Give a user a role in an organisation",
                _ok("Object"),
                params=["org_id"],
                body=_body(tenancy.Membership),
            ),
            by_roles=True,
        ),
        Route(
            "DELETE",
            "/admin/organizations/{org_id}/members/{user}",
            tenancy.remove_org_member,
            admin_deps,
            scopes.ORGS_ADMIN,
            _op("Take a user's role in an organisation away", _ok("Object"), params=["org_id", "user"]),
            by_roles=True,
        ),
        Route(
            "POST",
            "/admin/teams",
            tenancy.create_team,
            admin_deps,
            scopes.ORGS_ADMIN,
            _op("Create a team", _ok("Object", status="201"), body=_body(tenancy.NewTeam)),
            by_roles=True,
        ),
        Route(
            "GET",
            "/admin/teams",
            tenancy.list_teams,
            admin_deps,
            scopes.ADMIN_READ,
            _op("List teams", _ok("Object")),
            by_roles=True,
        ),
        Route(
            "GET",
            "/admin/teams/{team_id}",
            tenancy.show_team,
            admin_deps,
            scopes.ADMIN_READ,
            _op("A team", _ok("Object"), params=["team_id"]),
            by_roles=True,
        ),
        Route(
            "POST",
            "/admin/teams/{team_id}",
            tenancy.change_team,
            admin_deps,
            scopes.ORGS_ADMIN,
            _op("Change a team", _ok("Object"), params=["team_id"], body=_body(tenancy.OrganizationChange)),
        ),
        Route(
            "GET",
            "/admin/teams/{team_id}/members",
            tenancy.team_members,
            admin_deps,
            scopes.ADMIN_READ,
            _op("A team's members", _ok("Object"), params=["team_id"]),
            by_roles=True,
        ),
        Route(
            "POST",
            "/admin/teams/{team_id}/members",
            tenancy.set_team_member,
            admin_deps,
            scopes.ORGS_ADMIN,
            _op("Give a user a role in a team", _ok("Object"), params=["team_id"], body=_body(tenancy.Membership)),
            by_roles=True,
        ),
        Route(
            "DELETE",
            "/admin/teams/{team_id}/members/{user}",
            tenancy.remove_team_member,
            admin_deps,
            scopes.ORGS_ADMIN,
            _op("Take a user out of a team", _ok("Object"), params=["team_id", "user"]),
            by_roles=True,
        ),
        Route(
            "GET",
            "/admin/audit",
            admin.audit_log,
            admin_deps,
            scopes.ADMIN_READ,
            _op("The audit log of administrative changes, newest first", _ok("Object")),
        ),
        Route(
            "POST",
            "/admin/route",
            admin.explain_route,
            admin_deps,
            scopes.ADMIN_READ,
            _op("Explain a routing decision", _ok("Object"), body=_body(schema="Object")),
        ),
        # Operations
        Route(
            "GET",
            "/healthz",
            ops.healthz,
            ops_deps,
            scopes.PUBLIC,
            _op("The process is alive", _ok("Object"), public=True),
            quiet=True,
        ),
        Route(
            "GET",
            "/readyz",
            ops.readyz,
            ops_deps,
            scopes.PUBLIC,
            _op("The gateway can serve", ready, public=True),
            quiet=True,
        ),
        Route("GET", "/metrics", ops.metrics, ops_deps, metrics_scope, _op("Prometheus metrics", _TEXT), quiet=True),
        Route(
            "GET",
            "/openapi.json",
            openapi.serve,
            openapi_deps,
            scopes.PUBLIC,
            _op("This document", _ok("Object"), public=True),
        ),
        # The console (api/console.py): single sign-on, and the admin API as the session's principal. Public as
        # routes: the handlers check the session cookie (and the CSRF header of a change).
        Route(
            "GET",
            "/dashboard/sso",
            console.sso_start,
            dashboard_deps,
            scopes.PUBLIC,
            _op("Sign in to the console with single sign-on (to the identity provider)", _REDIRECT, public=True),
        ),
        Route(
            "GET",
            "/dashboard/sso/callback",
            console.sso_callback,
            dashboard_deps,
            scopes.PUBLIC,
            _op("The identity provider's answer to a sign-in", _REDIRECT, public=True),
        ),
        Route(
            "GET",
            "/dashboard/api/me",
            console.me,
            dashboard_deps,
            scopes.PUBLIC,
            _op("The console session: its user, scopes and roles", _ok("Object"), public=True),
        ),
        *(
            Route(
                method,
                "/dashboard/api/{rest}",
                console.admin_api,
                dashboard_deps,
                scopes.PUBLIC,
                _op(
                    f"The admin API's {method} /admin/<rest>, as the console session",
                    _ok("Object"),
                    params=["rest"],
                    public=True,
                ),
            )
            for method in ("GET", "POST", "DELETE")
        ),
        # The dashboard signs in with an admin key held in its own cookie (api/dashboard.py checks it).
        Route(
            "GET",
            "/dashboard",
            dashboard.page,
            dashboard_deps,
            scopes.PUBLIC,
            _op("The operator dashboard, or its sign-in form", _HTML, public=True),
        ),
        Route(
            "POST",
            "/dashboard/login",
            dashboard.login,
            dashboard_deps,
            scopes.PUBLIC,
            _op("Sign in to the dashboard", login, body=_LOGIN_FORM, public=True),
        ),
        Route(
            "POST",
            "/dashboard/logout",
            dashboard.logout,
            dashboard_deps,
            scopes.PUBLIC,
            _op("Sign out of the dashboard", _REDIRECT, public=True),
        ),
        Route(
            "GET",
            "/dashboard/data",
            dashboard.data,
            dashboard_deps,
            scopes.PUBLIC,
            _op("What the dashboard shows", _ok("Object"), public=True),
        ),
        # Its script and styles (its CSP allows no inline ones); nothing secret in them.
        Route(
            "GET",
            "/dashboard/static/{name}",
            dashboard.static,
            dashboard_deps,
            scopes.PUBLIC,
            _op(
                "The dashboard's script and styles (its CSP allows nothing inline)",
                _STATIC,
                params=["name"],
                public=True,
            ),
        ),
    ]
