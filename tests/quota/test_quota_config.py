"""Quota configuration: tiers, per-key overrides, budgets, and the errors a bad file gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from portcullis.config import ConfigError, build_config, load_config
from portcullis.identity.principal import Principal
from portcullis.quota.plan import build_plan, user_tag
from portcullis.quota.stage import duration

MODELS = {"m": {"deployments": [{"url": "http://127.0.0.1:9", "cost": {"completion_per_1k": 0.5}}]}}


def config(**sections: object):
    return build_config({"models": MODELS, **sections}, source="(test)", environ={})


def test_a_keys_limits_override_its_tier_field_by_field() -> None:
    cfg = config(
        tiers={"gold": {"limits": {"requests": {"minute": 100, "day": 1000}, "tokens": {"minute": 5000}}}},
        quota={"users": {"ann": {"budget": {"month": 20}}}},
    )
    key = Principal(
        user="ann",
        tier="gold",
        scopes=frozenset(),
        key_id="abc",
        limits={"requests": {"minute": 10}, "concurrency": 2},
        budget={"day": 1.5},
    )
    plan = build_plan(cfg, key)
    assert [(w.label, w.limit) for w in plan.windows] == [
        ("requests per minute", 10),
        ("requests per day", 1000),
        ("tokens per minute", 5000),
    ]
    assert plan.concurrency == 2
    assert [(b.subject, b.period, b.limit) for b in plan.budgets] == [
        ("key", "day", 1_500_000),
        ("user", "month", 20_000_000),
    ]
    assert plan.subject == "k:abc" and plan.tag == user_tag("ann")
    assert cfg.models["m"].deployments[0].cost.completion_per_1k == 0.5


def test_jwt_principals_are_limited_per_user_and_keys_of_a_user_share_a_hash_slot() -> None:
    cfg = config(tiers={"t": {"limits": {"requests": {"hour": 5}}}})
    user = build_plan(cfg, Principal(user="bob", tier="t", scopes=frozenset(), via="jwt"))
    key = build_plan(cfg, Principal(user="bob", tier="t", scopes=frozenset(), key_id="k1"))
    assert user.subject == "u" and key.subject == "k:k1"
    assert user.tag == key.tag and user.tag.startswith("{pc:") and user.tag.endswith("}")


def test_default_tiers_limit_free_and_premium_and_leave_enterprise_open() -> None:
    cfg = config()
    assert cfg.tiers["free"].limits.requests.minute == 60 and cfg.tiers["free"].limits.concurrency == 4
    assert build_plan(cfg, Principal(user="x", tier="enterprise", scopes=frozenset())).empty


def test_bad_quota_settings_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        """
tiers:
  free: {limits: {requests: {minute: 0, week: 3}, concurrency: -1}}
quota: {backend: redis, alert_thresholds: [0.5, 1.5], on_store_error: maybe}
models: {m: {deployments: [{url: "http://127.0.0.1:9", cost: {prompt_per_1k: -1}}]}}
"""
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    text = err.value.render()
    for field in (
        "tiers.free.limits.requests.minute",
        "tiers.free.limits.requests.week: unknown key",
        "tiers.free.limits.concurrency",
        "quota.alert_thresholds",
        "quota.on_store_error",
        "models.m.deployments[0].cost.prompt_per_1k",
    ):
        assert field in text, text
    path.write_text("quota: {backend: redis}\nmodels: {m: {deployments: [{url: 'http://127.0.0.1:9'}]}}\n")
    with pytest.raises(ConfigError, match=r"store\.redis_url is not set"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.0201, "21ms"), (1, "1s"), (59.2, "1m0s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_reset_durations_read_like_openais(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# -- levels: a key's team and organisation ------------------------------------------------------------------


def _member(user: str, org: str, team: str = "team_x", **levels: object) -> Principal:
    """A key's principal in `team` of `org` (as KeyRecord.principal makes it)."""
    from portcullis.identity.principal import Placement

    own = Principal(user=user, tier="gold", scopes=frozenset(), key_id=f"k{org[-3:]}")
    return Placement(team_id=team, org_id=org, team_name="search", org_name="acme", **levels).apply(own)  # type: ignore[arg-type]


def test_a_users_budget_spans_their_keys_in_every_organisation() -> None:
    from portcullis.quota.store import budget_key

    cfg = config(tiers={"gold": {}}, quota={"users": {"ann": {"budget": {"day": 1}}}})
    plans = [build_plan(cfg, _member("ann", org)) for org in ("org_default", "org_acme", "org_other")]
    keys = {budget_key(p, [b.subject for b in p.budgets].index("user"), "d20270101") for p in plans}
    assert keys == {user_tag("ann") + ":b:u:d20270101"}  # one counter, whichever organisation the key is in
    # On Redis Cluster one script reaches one slot: the user's budget is counted per organisation there.
    clustered = config(tiers={"gold": {}}, quota={"users": {"ann": {"budget": {"day": 1}}}, "redis_cluster": True})
    in_acme = build_plan(clustered, _member("ann", "org_acme"))
    assert budget_key(in_acme, 0, "d20270101").startswith("{pc:o:org_acme}:b:u:")


def test_a_plan_is_made_again_when_its_levels_change() -> None:
    """The plan cache is keyed by the levels' settings too: a request authenticated before a team's limits
    changed, or a key loaded then, cannot bring the old plan back after the change."""
    from portcullis.obs.logging import get_logger
    from portcullis.obs.metrics import Metrics
    from portcullis.quota.stage import Quota
    from portcullis.routing.catalog import Catalog

    cfg = config(tiers={"gold": {}})
    catalog = Catalog.from_config(cfg)
    quota = Quota(cfg, Metrics(catalog), get_logger("t"), catalog)
    narrow = _member("ann", "org_acme", team_limits={"requests": {"minute": 10}, "concurrency": 3})
    wide = _member("ann", "org_acme", team_limits={"requests": {"minute": 1000}})
    assert [w.limit for w in quota.plan_for(narrow)[0].windows] == [10]
    assert [w.limit for w in quota.plan_for(wide)[0].windows] == [1000]
    assert [w.limit for w in quota.plan_for(narrow)[0].windows] == [10]
    # The batch runner's in-flight cap is the tightest level's.
    assert quota.concurrency_of(narrow) == 3 and quota.concurrency_of(wide) is None
    # The default organisation's keys carry no levels (and keep the user's hash tag).
    plain = quota.plan_for(_member("ann", "org_default", team_limits={"requests": {"minute": 10}}))[0]
    assert plain.windows == () and plain.levels == () and plain.tag == user_tag("ann")
