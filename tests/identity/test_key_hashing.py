from __future__ import annotations

import hashlib
import hmac

import pytest

from portcullis.identity.keys import KeyHasher, generate_key, key_id_of


@pytest.mark.parametrize("secret", [b"s" * 16, b"0123456789abcdef" * 4, b"x" * 64, b"long" * 40])
def test_key_hash_is_standard_hmac_sha256(secret: bytes) -> None:
    hasher = KeyHasher(secret)
    for _ in range(5):
        _, key = generate_key()
        expected = hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()
        assert hasher.hash(key) == expected
        assert hasher.matches(key, expected)
        assert not hasher.matches(key[:-1] + ("A" if key[-1] != "A" else "B"), expected)


def test_key_format_and_id() -> None:
    key_id, key = generate_key()
    assert key.startswith(f"pc-{key_id}-") and len(key_id) == 16
    assert key_id_of(key) == key_id
    for bad in ("", "pc-", "sk-" + key[3:], key.replace(key_id, key_id.upper()), f"pc-{key_id}-short", key + " "):
        assert key_id_of(bad) is None


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        KeyHasher(b"short")
