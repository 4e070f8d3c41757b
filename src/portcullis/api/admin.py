"""The admin API: keys (create, list, show, revoke, rotate), usage, switching models back on, backends,
models and deployments with their live state, and the router's decision for a request.

Key ids are not secret, but a response for an unknown id is the same 404 whatever the reason, and the
key itself appears exactly once: in the answer that created it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from portcullis.api.common import actor, query_int, query_params, read_model
from portcullis.config import BudgetConfig, LimitsConfig
from portcullis.errors import Forbidden, InvalidRequest, NotFound
from portcullis.exchange import Exchange
from portcullis.http import Request
from portcullis.identity import roles, scopes
from portcullis.identity.auth import require_model
from portcullis.identity.keys import KeyRecord, KeyStore, now
from portcullis.identity.principal import DEFAULT_TEAM
from portcullis.identity.tenancy import TenancyStore
from portcullis.quota import usage
from portcullis.quota.plan import period_bounds
from portcullis.routing.catalog import NATIVE_RETRY_S, Replica
from portcullis.safety.validation import parse_json_object, validate_chat, validate_completion
from portcullis.store import audit

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from portcullis.config import Config
    from portcullis.routing.admission import Admission
    from portcullis.routing.catalog import Catalog
    from portcullis.routing.router import Router
    from portcullis.store.model_state import ModelState


@dataclass(frozen=True, slots=True)
class AdminDeps:
    """What the admin handlers use."""

    config: Config
    catalog: Catalog
    admission: Admission
    router: Router
    engine: AsyncEngine  # usage reports
    model_state: ModelState
    publish: Callable[[dict[str, Any]], Awaitable[None]]  # tell every process (a key revoked, a model back on)
    key_store: Callable[[], KeyStore | None]  # made at preflight (None: API keys are off)
    # Hosts that load models on demand: each one's models, their state, queue and load time (hosts/schedule.py).
    host_snapshots: Callable[[], list[dict[str, Any]]] = lambda: []

    @property
    def keys(self) -> KeyStore | None:
        return self.key_store()


# The longest expiry or rotation grace an admin may ask for: 100 years.
MAX_SPAN_S = 100 * 365.25 * 86400


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str = Field(min_length=1, max_length=256)
    tier: str | None = None  # (default: its team's default tier, else its organisation's)
    team_id: str | None = Field(default=None, max_length=32)  # (default: the default organisation's default team)
    scopes: list[str] | None = None
    models: list[str] | None = None
    # Bounded (and finite) so that now + expires_in_s is a date the key store can hold: 1e308 overflowed
    # datetime arithmetic into a 500. A key that should never expire omits the field.
    expires_in_s: float | None = Field(default=None, gt=0, le=MAX_SPAN_S, allow_inf_nan=False)
    label: str | None = Field(default=None, max_length=256)
    # Overrides of the tier's limits (same shape as tiers.<name>.limits), and the key's own budget.
    limits: LimitsConfig | None = None
    budget: BudgetConfig | None = None

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, value: list[str] | None) -> list[str] | None:
        return list(scopes.parse(value)) if value is not None else None


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_s: float | None = Field(default=None, ge=0, le=MAX_SPAN_S, allow_inf_nan=False)  # (as expires_in_s)


def _store(api: AdminDeps) -> KeyStore:
    if api.keys is None:
        raise NotFound("API keys are not enabled on this gateway.", code="not_found")
    return api.keys


async def _reach(api: AdminDeps, ex: Exchange, scope: str) -> roles.Access | None:
    """None: the principal holds `scope`; else what its roles reach (identity/roles.py)."""
    assert ex.principal is not None
    return await roles.access(TenancyStore(api.engine), ex.principal, scope)


async def _role_key(
    api: AdminDeps, access: roles.Access | None, record: KeyRecord | None, *, manage: bool
) -> KeyRecord:
    """The key, if the principal's roles reach it (to see it, or to change it); 404 when they do not see it. A role
    changes only ordinary keys (what a role could have made itself): rotating an operator's admin key would hand
    its new secret to the role."""
    if record is None or (access is not None and not access.sees_key(record.team_id, record.user)):
        raise NotFound("No such key.", code="key_not_found")
    if manage and access is not None:
        if not access.manages_key(record.team_id, record.user):
            raise Forbidden("Your role in the key's team lets you see it, not change it.", code="role_forbids")
        default_tier = (await _placed(api, record.team_id, None))[1]
        ordinary = set(record.scopes) <= {*scopes.DEFAULT, scopes.ROLES} and record.tier == default_tier
        if not ordinary or not _tightens(api, record.limits, record.tier):
            raise Forbidden(
                "The key holds more than a role may give (scopes, tier or limits): an administrator changes it.",
                code="role_forbids",
            )
    return record


def _tightens(api: AdminDeps, limits: dict[str, Any] | None, tier: str) -> bool:
    """Whether a key's own limits only tighten its tier's (what a role may set): each window and the concurrency at
    most the tier's (a tier's unlimited field takes any)."""
    if not limits:
        return True
    own = LimitsConfig.model_validate(limits)
    base = api.config.tiers[tier].limits if tier in api.config.tiers else LimitsConfig()
    pairs = [(own.concurrency, base.concurrency)] if "concurrency" in own.model_fields_set else []
    for kind in ("requests", "tokens"):
        mine, theirs = getattr(own, kind), getattr(base, kind)
        pairs += [(getattr(mine, f), getattr(theirs, f)) for f in mine.model_fields_set]
    return all(theirs is None or (mine is not None and mine <= theirs) for mine, theirs in pairs)


async def create_key(api: AdminDeps, req: Request, ex: Exchange) -> None:
    store = _store(api)
    spec: NewKey = await read_model(api.config, req, NewKey)
    access = await _reach(api, ex, scopes.KEYS_ADMIN)
    if access is not None:
        await _by_role(api, access, spec)
    team, tier = await _placed(api, spec.team_id, spec.tier if access is None else None)
    if access is not None:
        if spec.tier is not None and spec.tier != tier:
            raise Forbidden(f"A key made by a role has its team's default tier ('{tier}').", code="role_forbids")
        if spec.limits is not None and not _tightens(api, spec.limits.model_dump(exclude_unset=True), tier):
            raise Forbidden(
                f"A key made by a role may only tighten its tier's limits ('{tier}').",
                code="role_forbids",
                param="limits",
            )
    key, record = await store.create(
        user=spec.user,
        tier=tier,
        team=team,
        scopes=tuple(spec.scopes) if spec.scopes is not None else scopes.DEFAULT,
        models=tuple(spec.models) if spec.models is not None else None,
        expires_at=now() + timedelta(seconds=spec.expires_in_s) if spec.expires_in_s else None,
        label=spec.label,
        limits=spec.limits.model_dump(exclude_unset=True) if spec.limits is not None else None,
        budget=spec.budget.model_dump(mode="json", exclude_none=True) if spec.budget is not None else None,
        actor=actor(api.config, req, ex),
    )
    await req.respond_json(201, {**record.public(), "key": key})


async def _by_role(api: AdminDeps, access: roles.Access, spec: NewKey) -> None:
    """A key made by a role: in a team the role reaches; for the role's own user, or (a team's or an organisation's
    admin) for a user who has a role in that team; with no more than an ordinary key's scopes, and `roles:act` only
    for one's own user (a key acting with another user's roles would be theirs to wield)."""
    if spec.team_id is None or access.role(spec.team_id) is None:
        raise InvalidRequest("'team_id' must name a team your roles reach.", param="team_id", code="invalid_value")
    if not access.manages_key(spec.team_id, spec.user):
        raise Forbidden("Your role in the team lets you make keys for yourself only.", code="role_forbids")
    granted = set(spec.scopes if spec.scopes is not None else scopes.DEFAULT)
    beyond = sorted(granted - {*scopes.DEFAULT, scopes.ROLES})
    if beyond:
        raise Forbidden(f"A key made by a role cannot hold {', '.join(beyond)}.", code="role_forbids", param="scopes")
    if spec.user != access.user:
        if scopes.ROLES in granted:
            raise Forbidden("Only a key for yourself may act by roles (roles:act).", code="role_forbids")
        team = await TenancyStore(api.engine).team(spec.team_id)
        members = await TenancyStore(api.engine).members(team.org_id or "", spec.team_id) if team else []
        if spec.user not in {m["user"] for m in members}:
            raise Forbidden(
                f"'{spec.user}' has no role in the team: give them one first, or make the key for yourself.",
                code="role_forbids",
                param="user",
            )


async def _placed(api: AdminDeps, team_id: str | None, tier: str | None) -> tuple[str, str]:
    """A new key's team (it must exist) and tier: the one asked for, else its team's default, else its
    organisation's."""
    tenancy = TenancyStore(api.engine)
    team = await tenancy.team(team_id or DEFAULT_TEAM)
    if team is None:
        raise InvalidRequest(f"No team '{team_id}'.", param="team_id", code="invalid_value")
    if tier is None:
        org = await tenancy.org(team.org_id or "")
        tier = team.default_tier or (org.default_tier if org is not None else None)
        if tier is None:
            raise InvalidRequest(
                "'tier' is required: the key's team and organisation have no default tier.",
                param="tier",
                code="invalid_value",
            )
    if tier not in api.config.tiers:
        raise InvalidRequest(f"Unknown tier '{tier}'.", param="tier", code="invalid_value")
    return team.id, tier


async def list_keys(api: AdminDeps, req: Request, ex: Exchange) -> None:
    query = query_params(req)
    access = await _reach(api, ex, scopes.KEYS_ADMIN)
    records = await _store(api).list(user=query.get("user"), team=query.get("team_id"))
    if access is not None:
        records = [r for r in records if access.sees_key(r.team_id, r.user)]
    await req.respond_json(200, {"object": "list", "data": [r.public() for r in records]})


async def show_key(api: AdminDeps, req: Request, ex: Exchange, key_id: str) -> None:
    access = await _reach(api, ex, scopes.KEYS_ADMIN)
    record = await _role_key(api, access, await _store(api).get(key_id), manage=False)
    await req.respond_json(200, record.public())


async def revoke_key(api: AdminDeps, req: Request, ex: Exchange, key_id: str) -> None:
    access = await _reach(api, ex, scopes.KEYS_ADMIN)
    if access is not None:
        await _role_key(api, access, await _store(api).get(key_id), manage=True)
    record = await _store(api).revoke(key_id, actor=actor(api.config, req, ex))
    if record is None:
        raise NotFound("No such key.", code="key_not_found")
    await api.publish({"type": "key", "id": key_id})
    await req.respond_json(200, record.public())


async def rotate_key(api: AdminDeps, req: Request, ex: Exchange, key_id: str) -> None:
    spec: Rotation = await read_model(api.config, req, Rotation)
    access = await _reach(api, ex, scopes.KEYS_ADMIN)
    if access is not None:
        await _role_key(api, access, await _store(api).get(key_id), manage=True)
    grace = spec.grace_s if spec.grace_s is not None else api.config.auth.rotation_grace_s
    rotated = await _store(api).rotate(key_id, grace_s=grace, actor=actor(api.config, req, ex))
    if rotated is None:
        raise NotFound("No such active key.", code="key_not_found")
    key, successor, old = rotated
    await api.publish({"type": "key", "id": key_id})
    await req.respond_json(201, {**successor.public(), "key": key, "replaces": old.public()})


async def usage_report(api: AdminDeps, req: Request, ex: Exchange) -> None:
    """GET /admin/usage?group_by=day,user,model&since=YYYY-MM-DD&until=...&user=&key_id=&model=&format=json|table"""
    query = query_params(req)
    try:
        group_by = usage.parse_group_by(query.get("group_by"))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="group_by", code="invalid_value") from exc
    for name in ("since", "until"):
        value = query.get(name)
        if value is not None and not _DAY.match(value):
            raise InvalidRequest(f"'{name}' must be a UTC day, YYYY-MM-DD.", param=name, code="invalid_value")
    access = await _reach(api, ex, scopes.USAGE)
    visible = None
    if access is not None:  # the usage of the keys its roles let it see
        visible = [r.id for r in await _store(api).list() if access.sees_key(r.team_id, r.user)]
    rows = await usage.aggregate(
        api.engine,
        group_by=group_by,
        since=query.get("since"),
        until=query.get("until"),
        user=query.get("user"),
        key_id=query.get("key_id"),
        model=query.get("model"),
        key_ids=visible,
    )
    if query.get("format") == "table":
        table = usage.render_table(rows, group_by, api.config.quota.currency)
        await req.respond(200, table.encode(), [(b"content-type", b"text/plain; charset=utf-8")])
        return
    if query.get("format") == "csv":
        headers = [
            (b"content-type", b"text/csv; charset=utf-8"),
            (b"content-disposition", b'attachment; filename="usage.csv"'),
        ]
        await req.respond(200, usage.render_csv(rows, group_by).encode(), headers)
        return
    await req.respond_json(
        200, {"object": "list", "group_by": group_by, "currency": api.config.quota.currency, "data": rows}
    )


async def budgets(api: AdminDeps, req: Request, ex: Exchange) -> None:
    """GET /admin/budgets: every budget of an organisation, a team or a key (those a role reaches), with what was spent
    in its period so far (the usage table) and a forecast to the period's end at the rate so far."""
    access = await _reach(api, ex, scopes.USAGE)
    now = datetime.now(UTC)
    starts = period_bounds(now)
    keys = [k for k in await _store(api).list() if access is None or access.sees_key(k.team_id, k.user)]
    spent = {
        period: {
            r["key"]: r["cost"]
            for r in await usage.aggregate(api.engine, group_by=["key"], since=start.strftime("%Y-%m-%d"))
        }
        for period, (start, _) in starts.items()
    }
    levels: dict[tuple[str, str], tuple[str, dict[str, Any], list[str]]] = {}  # (kind, id) -> name, budget, its keys
    for key in keys:
        placement = key.placement
        if key.budget:
            levels[("key", key.id)] = (key.label or key.id, key.budget, [key.id])
        if placement.team_budget and (access is None or access.role(key.team_id) not in (None, "member")):
            levels.setdefault(("team", key.team_id), (placement.team_name, placement.team_budget, []))[2].append(key.id)
        if placement.org_budget and (access is None or placement.org_id in access.orgs):
            levels.setdefault(("organization", placement.org_id), (placement.org_name, placement.org_budget, []))[
                2
            ].append(key.id)
    data = []
    for (kind, level_id), (name, budget, key_ids) in sorted(levels.items()):
        for period, limit in budget.items():
            if period == "range" and isinstance(limit, dict):  # a fixed span: reported while it runs
                span = BudgetConfig.model_validate({"range": limit}).range
                assert span is not None
                start, end = span.bounds()
                if not start <= now < end:
                    continue
                last = (end - timedelta(days=1)).strftime("%Y-%m-%d")
                rows = await usage.aggregate(api.engine, group_by=["key"], since=f"{start:%Y-%m-%d}", until=last)
                spent_in = {r["key"]: r["cost"] for r in rows}
                limit = span.amount
            elif period in starts and limit:
                start, end = starts[period]
                spent_in = spent[period]
            else:
                continue
            used = round(sum(spent_in.get(k, 0.0) for k in key_ids), 6)
            elapsed = max((now - start).total_seconds(), 60.0) / (end - start).total_seconds()
            data.append(
                {
                    "level": kind,
                    "id": level_id,
                    "name": name,
                    "period": period,
                    "limit": limit,
                    "spent": used,
                    "share": round(used / limit, 4),
                    "forecast": round(used / min(1.0, elapsed), 6),
                    "period_ends": end.isoformat(),
                }
            )
    await req.respond_json(200, {"object": "list", "currency": api.config.quota.currency, "data": data})


async def enable_model(api: AdminDeps, req: Request, ex: Exchange, model: str) -> None:
    if model not in api.catalog.models:
        raise NotFound(f"The model '{model}' does not exist.", param="model", code="model_not_found")
    require_model(ex.principal, model)  # as DELETE /v1/models: a principal limited to some models switches no other
    await api.model_state.set_model_disabled(model, False, actor=actor(api.config, req, ex))
    await api.publish({"type": "model", "name": model, "disabled": False})
    await req.respond_json(200, {"id": model, "object": "model", "enabled": True})


async def audit_log(api: AdminDeps, req: Request, ex: Exchange) -> None:
    """GET /admin/audit?limit=&after=&since=&until=&action=&target=&actor=: the audit log, newest first."""
    query = query_params(req)
    times: dict[str, float | None] = {}
    for name in ("since", "until"):
        value = query.get(name)
        times[name] = _instant(value, name) if value is not None else None
    action = query.get("action")
    if action is not None and not _ACTION.match(action):
        raise InvalidRequest("'action' must be an action (key.revoke) or an object (key).", param="action")
    after = query.get("after")
    entries, more = await audit.read(
        api.engine,
        limit=query_int(query, "limit", 100, 1, audit.MAX_PAGE),
        after=query_int(query, "after", 0, 1, 2**62) if after is not None else None,
        since=times["since"],
        until=times["until"],
        action=action,
        target=query.get("target"),
        actor=query.get("actor"),
    )
    page: dict[str, Any] = {"object": "list", "data": entries, "has_more": more}
    if entries:
        page |= {"first_id": entries[0]["id"], "last_id": entries[-1]["id"]}
    await req.respond_json(200, page)


_ACTION = re.compile(r"^[a-z_]+(?:\.[a-z_]+)?\Z")


def _instant(value: str, name: str) -> float:
    try:
        return audit.parse_instant(value)
    except ValueError:
        raise InvalidRequest(
            f"'{name}' must be POSIX seconds or an ISO 8601 date or time.", param=name, code="invalid_value"
        ) from None


_DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")  # ASCII digits (\d takes any script's); \Z: no trailing newline


def _signals(r: Replica, now: float) -> dict[str, Any] | None:
    s = r.signals
    if now >= s.fresh_until:
        return None
    return {
        "processing": s.processing if s.metrics_at else None,
        "deferred": s.deferred if s.metrics_at else None,
        "busy_slots": s.busy_slots if s.slots_at else None,
        "kv_utilization": round(s.kv_utilization, 4) if s.kv_utilization is not None else None,
        "other_clients": s.external,
        "prompt_tokens_per_s": s.prompt_tps,
        "tokens_per_s": s.decode_tps,
    }


async def hosts(api: AdminDeps, req: Request, ex: Exchange) -> None:
    """GET /admin/hosts: each host (router-mode llama-server, launched servers) with its models' state, requests in
    flight and waiting, learned load times, and the swaps made (in all, and in the last hour)."""
    await req.respond_json(200, {"object": "list", "data": api.host_snapshots()})


async def backends(api: AdminDeps, req: Request, ex: Exchange) -> None:
    """GET /admin/backends: every model's slots and queue, every replica's health and breaker."""
    models = []
    moment = time.monotonic()
    for o in api.admission.outlooks():
        name = o.model
        replicas = []
        for r in api.catalog.models[name]:
            requests, failures = r.breaker.window()
            replicas.append(
                {
                    "name": r.name,
                    "url": r.url,
                    "kind": r.kind,
                    "state": r.state.value,
                    "last_error": r.last_error,
                    "in_flight": r.in_flight,
                    "host": r.host,  # (on a host: whether its model is loaded now: GET /admin/hosts tells more)
                    "loaded": r.loaded,
                    # llama-server's own reading of its load (health.load_signals), while fresh.
                    "server_load": _signals(r, moment),
                    "slots": r.limit,
                    "n_ctx": r.n_ctx,
                    # The APIs it is sent as the client spoke them, and those it answered 404/405 lately (sent
                    # translated to chat completions until native is tried again).
                    "native_apis": sorted(r.native),
                    "lacking_apis": {
                        path: {"retry_native_in_s": round(max(0.0, NATIVE_RETRY_S - (moment - since)), 1)}
                        for path, since in sorted(r.native_lost.items())
                    },
                    "breaker": {
                        "state": r.breaker.state.value,
                        "requests_in_window": requests if r.breaker.count_requests else None,
                        "failures_in_window": failures,
                        "retry_in_s": round(r.breaker.retry_in(), 3),
                        "half_open_probes_in_flight": r.breaker.probes,
                    },
                }
            )
        models.append(
            {
                "model": name,
                "enabled": o.enabled,
                "fallbacks": api.catalog.fallbacks.get(name, []),
                "slots": {"capacity": o.capacity, "in_use": o.in_use},
                "queue": {
                    "depth": o.depth,
                    "service_s": round(o.service_s, 4) if o.service_s is not None else None,
                    "estimated_wait_s": round(api.admission.queue_wait(name), 3) if o.depth else 0.0,
                },
                "ttft_p95_s": o.ttft_p95_s,
                "degraded": o.degraded,
                "retry_budget_denied": o.retries_denied,
                "replicas": replicas,
            }
        )
    await req.respond_json(200, {"object": "list", "data": models})


async def models(api: AdminDeps, req: Request, ex: Exchange) -> None:
    """GET /admin/models: every model with its deployments' live state, and every router."""
    data: list[dict[str, Any]] = []
    catalog = api.catalog
    aliases: dict[str, list[str]] = {}
    for alias, target in catalog.aliases.items():
        aliases.setdefault(target, []).append(alias)
    for name, replicas in catalog.models.items():
        data.append(
            {
                "model": name,
                "kind": "model",
                "enabled": name not in catalog.disabled,
                "aliases": aliases.get(name, []),
                "fallbacks": catalog.fallbacks.get(name, []),
                "deployments": [_deployment(r) for r in replicas],
            }
        )
    for name, router in catalog.routers.items():
        data.append(
            {
                "model": name,
                "kind": "router",
                "strategy": router.strategy,
                "candidates": list(router.candidates),
                "aliases": aliases.get(name, []),
                "scorer": router.scorer,
            }
        )
    await req.respond_json(200, {"object": "list", "data": data})


def _deployment(r: Replica) -> dict[str, Any]:
    if r.gpu_hour is None:
        basis = "configured"
    else:
        basis = "measured" if r.measured_tps is not None else "assumed"
    return {
        "name": r.name,
        "url": r.url,
        "kind": r.kind,
        "state": r.state.value,
        "breaker": r.breaker.state.value,
        "usable": r.usable(time.monotonic()),
        "quality": r.quality,
        "tags": list(r.tags),
        "n_ctx": r.context,
        "n_ctx_source": "upstream" if r.n_ctx is not None else ("config" if r.n_ctx_configured else None),
        "slots": r.limit,
        "in_flight": r.in_flight,
        "cost": {
            "prompt_per_1k": r.prompt_per_1k,
            "completion_per_1k": r.completion_per_1k,
            "gpu_hour": r.gpu_hour,
            "basis": basis,
        },
        "observed": {
            "ttft_s": r.ttft_s,
            "prefill_tokens_per_s": r.prefill_tps,
            "stream_tokens_per_s": r.stream_tps,
            "throughput_tokens_per_s": r.measured_tps,
        },
    }


async def explain_route(api: AdminDeps, req: Request, ex: Exchange) -> None:
    """POST /admin/route: a chat or completion request in, the router's decision for it now out (the
    request is not sent). Headers x-portcullis-max-cost / -latency-budget-ms / -priority apply."""
    raw = await req.read_body(api.config.server.max_body_bytes)
    payload = parse_json_object(raw, api.config.validation)
    if "messages" in payload:
        validate_chat(payload, api.config.validation)
    else:
        validate_completion(payload, api.config.validation)
    name = api.catalog.resolve(payload["model"])
    constraints = api.router.constraints(req, payload)
    decision = await api.router.decide(name, payload, constraints, ex.principal, asked=payload["model"])
    replica = api.router.explain_replica(decision, payload)
    await req.respond_json(
        200,
        {
            **decision.public(),
            "replica": replica.name if replica is not None else None,
            "header": decision.header().decode() if decision.router is not None else None,
        },
    )
