"""The moderation rules (PII detectors and their checks, keywords, patterns, the optional markup set),
the guard model's answer parsing and prompt, and the config's moderation mistakes."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from portcullis.config import ConfigError, GuardModelConfig, RulesConfig, load_config
from portcullis.routing.catalog import Catalog
from portcullis.safety.moderation import Finding, moderation_result
from portcullis.safety.moderators import GuardModel, ModeratorError
from portcullis.safety.rules import _REACH, _SLICE, Rules, _finditer, iban_ok, luhn_ok, redact


def _rules(**config: object) -> Rules:
    return Rules("r", RulesConfig.model_validate({"kind": "rules", **config}))


def _categories(rules: Rules, text: str) -> list[str]:
    return [m.category for m in rules.scan(text)]


PII = _rules(pii={"email": "redact", "phone": "redact", "card": "block", "iban": "redact", "national_id": "flag"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to jane.doe+news@mail.example.co.uk today", ["pii/email"]),
        ("card 4111 1111 1111 1111 exp 12/29", ["pii/card"]),
        ("card 4111-1111-1111-1111", ["pii/card"]),
        ("order 4111 1111 1111 1112 shipped", []),  # fails the Luhn check: an order number, not a card
        ("IBAN DE89 3704 0044 0532 0130 00 please", ["pii/iban"]),
        ("IBAN DE89 3704 0044 0532 0130 01 please", []),  # wrong check digits
        ("GB82WEST12345698765432", ["pii/iban"]),
        ("call +44 20 7946 0958 or (555) 123-4567 or 555-123-4567", ["pii/phone"] * 3),
        ("released on 2024-01-15, version 3.12.1, ip 192.168.100.200", []),  # dates, versions, addresses
        ("SSN 123-45-6789", ["pii/national_id"]),
        ("SSN 666-45-6789 and 123-00-6789", []),  # never issued
        ("NINO AB 12 34 56 C", ["pii/national_id"]),
        ("DNI 12345678Z", ["pii/national_id"]),
        ("DNI 12345678A", []),  # wrong check letter
        ("nothing personal here at all", []),
    ],
)
def test_pii_detectors(text: str, expected: list[str]) -> None:
    assert _categories(PII, text) == expected


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89370400440532013000") and iban_ok("de89 3704 0044 0532 0130 00")
    assert not iban_ok("DE8937040044053201300")  # a German IBAN is 22 characters


def test_redaction_rewrites_only_redact_matches_and_respects_an_end() -> None:
    text = "mail a@b.io, card 4111 1111 1111 1111, mail c@d.io"
    matches = PII.scan(text)
    assert [m.action for m in matches] == ["redact", "block", "redact"]
    assert redact(text, matches) == "mail [REDACTED:pii/email], card 4111 1111 1111 1111, mail [REDACTED:pii/email]"
    # Up to an end (the output guard never puts one inside a match): only what lies before it.
    end = text.index(", mail c")
    assert redact(text, matches, end=end) == "mail [REDACTED:pii/email], card 4111 1111 1111 1111"


def test_a_long_text_is_scanned_in_slices_with_the_same_matches_as_whole() -> None:
    # PII placed across every slice edge (and the reach's): sliced searches find what one search finds.
    rules = _rules(
        pii={"email": "redact", "phone": "redact", "card": "block", "iban": "redact", "national_id": "flag"},
        keywords=[{"name": "secret", "words": ["project nightshade"]}],
        patterns=[{"name": "tail", "regex": r"zz\w*$", "action": "flag"}],  # `$` must not match at a slice edge
    )
    pieces = [" bob.smith@example.com ", " 4111 1111 1111 1111 ", " +44 20 7946 0958 ", " project  nightshade ", " zz"]
    rng = random.Random(17)
    # Mostly short gaps; some longer than the reach, so that a match can run into a slice's end.
    gaps = [rng.randrange(0, 3_000) if rng.random() < 0.8 else rng.randrange(_REACH, 2 * _REACH) for _ in range(200)]
    text = "".join(rng.choice(pieces) + "w" * gap for gap in gaps) + " zzend"
    assert len(text) > 10 * (_SLICE + _REACH)
    for d in rules.detectors:
        whole = [m.span() for m in d.pattern.finditer(text)]
        assert [m.span() for m in _finditer(d.pattern, text)] == whole, d.category
    assert [m.category for m in rules.scan(text)].count("pii/email") == text.count("bob.smith@example.com")
    assert rules.scan(text)[-1].category == "tail"


def test_a_text_dense_with_matches_is_scanned_in_linear_time() -> None:
    text = "a@b.co " * 30_000  # 210 KB, 30,000 addresses: a pairwise overlap test took 50 s
    t0 = time.perf_counter()
    matches = PII.scan(text)
    assert len(matches) == 30_000
    assert time.perf_counter() - t0 < 3.0
    assert redact(text, matches).count("[REDACTED:pii/email]") == 30_000


def test_keywords_match_whole_words_and_phrases_in_any_case_and_spacing() -> None:
    rules = _rules(keywords=[{"name": "secret", "words": ["nightshade", "blue  moon"], "action": "block"}])
    assert _categories(rules, "Project NIGHTSHADE starts") == ["secret"]
    assert _categories(rules, "once in a Blue\n moon") == ["secret"]
    assert _categories(rules, "nightshades and deadly-nightshade") == ["secret"]  # '-' is not a word character
    assert _categories(rules, "bluemoon") == []


def test_patterns_and_their_replacement() -> None:
    rules = _rules(
        patterns=[{"name": "aws_key", "regex": r"AKIA[0-9A-Z]{16}", "action": "redact", "replacement": "<key>"}]
    )
    text = "key AKIAIOSFODNN7EXAMPLE here"
    assert redact(text, rules.scan(text)) == "key <key> here"


def test_the_markup_rule_set_is_off_unless_named() -> None:
    question = 'Why does <script src="x.js"> not run, and what does onclick= do?'
    assert _categories(PII, question) == []
    assert _categories(_rules(rule_sets=["markup_injection"]), question) == ["markup_injection"] * 2


async def _no_upstream(*args: object, **kwargs: object) -> tuple[int, object]:
    raise AssertionError("these tests only parse and prompt: nothing calls the guard model")


def _guard(**config: object) -> GuardModel:
    spec = GuardModelConfig.model_validate({"kind": "guard_model", "model": "g", **config})
    return GuardModel("g", spec, Catalog.__new__(Catalog), _no_upstream)


def test_guard_answers_are_parsed() -> None:
    guard = _guard()
    assert guard.parse("safe") == {}
    assert guard.parse("\n unsafe\nS1,S10\n") == {"violent_crimes": None, "hate": None}
    assert guard.parse("unsafe\nS99") == {"unknown": None}
    assert guard.parse("unsafe") == {"unspecified": None}
    with pytest.raises(ModeratorError):
        guard.parse("I cannot help with that.")
    custom = _guard(categories={"O1": "violence", "O2": "fraud"})
    assert custom.parse("unsafe\nO2") == {"fraud": None}


def test_the_guard_prompt_judges_the_last_turn_of_a_role() -> None:
    prompt = _guard().prompt([("user", "hi"), ("assistant", "hello there")], "assistant")
    assert "ONLY THE LAST Agent message" in prompt
    assert "User: hi\n\nAgent: hello there" in prompt
    assert "S1: Violent crimes." in prompt and "S14: Code interpreter abuse." in prompt
    custom = _guard(template="Judge {role}: {conversation}")
    assert custom.prompt([("user", "x")], "user") == "Judge User: User: x"


def test_moderation_results_fill_openai_categories() -> None:
    result = moderation_result([Finding("g", "violent_crimes", "block"), Finding("h", "violence", "block", 0.7)])
    assert result["flagged"] and result["categories"]["violence"] and result["categories"]["violent_crimes"]
    assert result["category_scores"]["violence"] == 1.0  # the guard gives no score: a hit counts as certain
    assert result["categories"]["hate"] is False and result["category_applied_input_types"]["violence"] == ["text"]
    assert moderation_result([])["flagged"] is False


BASE = """
models:
  chat: {deployments: [{url: "http://127.0.0.1:8080"}]}
"""


@pytest.mark.parametrize(
    ("section", "field", "reason"),
    [
        (
            "moderation: {moderators: {g: {kind: guard_model, model: nope}}}",
            "moderation.moderators.g.model",
            "not a configured model",
        ),
        ("moderation: {input: [ghost]}", "moderation.input", "'ghost' is not in moderation.moderators"),
        (
            "moderation: {moderators: {r: {kind: rules}}}\ntiers: {free: {moderation: {output: [x]}}}",
            "tiers.free.moderation.output",
            "'x' is not in moderation.moderators",
        ),
        (
            "moderation: {moderators: {r: {kind: rules, patterns: [{name: p, regex: '(unclosed'}]}}}",
            "moderation.moderators.r.rules.patterns.0.regex",
            "not a valid regular expression",
        ),
        (
            "moderation: {moderators: {o: {kind: openai_moderation, url: 'ftp://x'}}}",
            "moderation.moderators.o.openai_moderation.url",
            "http(s) URL",
        ),
        (
            "moderation: {moderators: {r: {kind: rules, pii: {passport: block}}}}",
            "moderation.moderators.r.rules.pii.passport",
            "",
        ),
        ("moderation: {moderators: {x: {kind: magic}}}", "moderation.moderators.x", "kind"),
        (
            "moderation: {moderators: {o: {kind: openai_moderation, url: 'http://m', api_key_env: K, api_key_file: /k}}}",  # noqa: E501
            "moderation.moderators.o.openai_moderation",
            "set api_key_env or api_key_file, not both",
        ),
        (
            "moderation: {stream_window_chars: 50, stream_context_chars: 50}",
            "moderation",
            "stream_context_chars must be smaller than stream_window_chars",
        ),
    ],
)
def test_moderation_mistakes_name_the_field(tmp_path: Path, section: str, field: str, reason: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(BASE + section + "\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={})
    text = exc.value.render()
    assert str(path) in text and reason in text
    assert field in text or field.replace(".0.", "[0].") in text, text
