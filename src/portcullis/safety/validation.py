"""Validation: the body parsed once, checked against the OpenAI schema and the configured limits.

The stage returns the client's own JSON object (NUL bytes stripped) for forwarding, plus the typed
model the later stages read. Every refusal is a 400 whose `param` names the offending field.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, cast
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ValidationError

from portcullis.config import ImageUrlPolicy, ValidationLimits
from portcullis.errors import InvalidRequest
from portcullis.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModerationImageInput,
    ModerationRequest,
    prompt_count,
)

_NUL_ESCAPE = b"\\u0000"


def _depth_exceeds(value: Any, limit: int) -> bool:
    """True when containers nest deeper than `limit`; iterative, so a hostile body cannot recurse us."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


def _strip_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_strip_nul(k): _strip_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_nul(v) for v in value]
    return value


def _param(loc: tuple[int | str, ...], model: type[BaseModel]) -> str:
    """pydantic's location as the field path a client recognises: messages[0].content."""
    path = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        # Discriminated unions and unions insert the member's tag or type name: drop those.
        if i > 0 and (part in _ROLES or part[:1].isupper() or part.startswith(("list[", "str", "int"))):
            continue
        path += f".{part}" if path else part
    return path


_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


def _schema_error(exc: ValidationError, model: type[BaseModel]) -> InvalidRequest:
    errors = exc.errors(include_url=False, include_input=False)
    # Union members each report; the most specific (deepest) error is the useful one.
    first = max(errors, key=lambda e: len(e["loc"]))
    param = _param(first["loc"], model)
    message = first["msg"]
    if first["type"] == "missing":
        message = f"'{param}' is a required property"
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return InvalidRequest(message, param=param or None, code="invalid_value")


def parse_json_object(body: bytes, limits: ValidationLimits) -> dict[str, Any]:
    if not body:
        raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(obj, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    # A body cannot nest deeper than it has brackets: counting them runs at C speed and lets the
    # usual request skip the walk (which cost about 2% of the gateway's CPU per request).
    if body.count(b"{") + body.count(b"[") > limits.max_json_depth and _depth_exceeds(obj, limits.max_json_depth):
        raise InvalidRequest(
            f"The request body nests deeper than {limits.max_json_depth} levels.", code="json_too_deep"
        )
    if _NUL_ESCAPE in body:
        stripped: dict[str, Any] = _strip_nul(obj)  # a dict in, a dict out
        return stripped
    return obj


def _validate(obj: dict[str, Any], model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise _schema_error(exc, model) from exc


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.model_extra.get("text") or "") for p in content if p.type == "text")
    return 0


_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")
# llama-server's own name for n (it wins over n there); best_of generates that many answers upstream.
_CHOICE_FIELDS = ("n", "n_cmpl")
_CHOICE_KEYS = frozenset((*_CHOICE_FIELDS, "best_of"))


_JSON_KINDS = {str: "a string", float: "a decimal number", bool: "a boolean", list: "an array", dict: "an object"}


def _count(value: Any, field: str) -> int:
    """A length or choice count as the client gave it: a JSON integer >= 1, nothing else. Upstreams read
    these fields by their own rules (llama-server ignores a string, truncates a float, takes true as 1,
    and -1 as "no limit"), so anything but a plain positive integer would be checked as one value and
    obeyed as another."""
    if type(value) is not int:  # bool is an int subclass: `type` keeps it out
        kind = _JSON_KINDS.get(type(value), "a value of another type")
        raise InvalidRequest(
            f"Invalid type for '{field}': expected an integer, got {kind}.", param=field, code="invalid_type"
        )
    if value < 1:
        raise InvalidRequest(
            f"Invalid value for '{field}': {value}; it must be at least 1.", param=field, code="invalid_value"
        )
    return value


def _too_long(field: str, length: int, ceiling: int) -> InvalidRequest:
    return InvalidRequest(
        f"'{field}' is {length}; this gateway allows at most {ceiling}.", param=field, code="max_tokens_too_large"
    )


def _normalise_lengths(obj: dict[str, Any], request: Any, limits: ValidationLimits) -> None:
    """Hold every length field to one value, the smallest given (or the ceiling when none is), checked
    against the ceiling; the forwarded body then carries that value in each length field it has, plus
    max_tokens when it has neither OpenAI field, so no upstream reads a longer limit than the one checked
    and every later stage (reservation, context fit, degradation) reads it from max_tokens."""
    ceiling = limits.max_tokens_ceiling
    natives = limits.native_length_fields
    if "max_completion_tokens" not in obj and (not natives or obj.keys().isdisjoint(natives)):
        # The usual request: max_tokens alone (the schema held it to a strict integer >= 1) or nothing.
        # Two lookups and no writes: this runs on every chat request.
        length = request.max_tokens
        if length is None:
            if ceiling is not None:
                # No limit given: the upstream's own default may be none (llama-server's n_predict -1).
                obj["max_tokens"] = request.max_tokens = ceiling
        elif ceiling is not None and length > ceiling:
            raise _too_long("max_tokens", length, ceiling)
        return
    length = None
    named = ""
    given: list[str] = []
    for fields in (_LENGTH_FIELDS, natives):
        for field in fields:
            value = obj.get(field)
            if value is None:
                continue
            _count(value, field)
            given.append(field)
            if length is None or value < length:
                length, named = value, field
    if length is None:  # only nulls
        if ceiling is not None:
            obj["max_tokens"] = request.max_tokens = ceiling
        return
    if ceiling is not None and length > ceiling:
        raise _too_long(named, length, ceiling)
    for field in given:
        obj[field] = length
    if "max_tokens" not in given and "max_completion_tokens" not in given:
        obj["max_tokens"] = length
    request.max_tokens = length
    if "max_completion_tokens" in given:
        request.max_completion_tokens = length


def _bound_choices(obj: dict[str, Any], request: Any, limits: ValidationLimits, prompts: int = 1) -> None:
    """n and llama-server's n_cmpl held to one value (the smaller), which `request.n` carries whichever of
    them was given (the reservation reads it there); each of them and best_of within max_choices, and so
    are the answers to all of a completion's `prompts` together (each prompt gets its own choices)."""
    if prompts == 1 and obj.keys().isdisjoint(_CHOICE_KEYS):
        return  # the usual request: one C-level set test
    choices: int | None = None
    best_of: int | None = None
    given = 0
    for field in (*_CHOICE_FIELDS, "best_of"):
        value = obj.get(field)
        if value is None:
            continue
        if _count(value, field) > limits.max_choices:
            raise InvalidRequest(
                f"'{field}' is {value}; this gateway allows at most {limits.max_choices} choices per request.",
                param=field,
                code="too_many_choices",
            )
        if field == "best_of":
            best_of = value
        else:
            given += 1
            choices = value if choices is None else min(choices, value)
    if given > 1:
        for field in _CHOICE_FIELDS:
            obj[field] = choices
    if choices is not None:
        # n_cmpl alone is obeyed as n upstream: reserved as n here, or it would be reserved as one answer.
        request.n = choices
    each = max(choices or 1, best_of or 1)
    if prompts > 1 and prompts * each > limits.max_choices:
        raise InvalidRequest(
            f"'prompt' holds {prompts} prompts of {each} choice{'s' if each > 1 else ''} each, "
            f"{prompts * each} in all; this gateway allows at most {limits.max_choices} choices per request.",
            param="prompt",
            code="too_many_choices",
        )


# -- image URLs -------------------------------------------------------------------------------------

# A DNS name or a dotted IPv4 address, lower case (what an allow-list entry or a URL's host may be).
HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
# Names that are loopback, link-local or private by definition (RFC 6761 localhost, mDNS .local,
# RFC 8375 home.arpa, the reserved .internal that cloud metadata services answer on).
_INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".localdomain")
_INTERNAL_NAMES = {"localhost", "localhost.localdomain", "local", "internal", "home.arpa"}
_URL_PARTS = ("image_url", "video_url", "audio_url")
_UNSAFE_URL_CHAR = re.compile(r"[\x00-\x20\x7f\\]")


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    # inet_aton reads every form a fetching client's resolver may take for an IPv4 literal:
    # 127.1, 0x7f.0.0.1, 017700000001, 2130706433. ipaddress alone would let them pass as names.
    if host and host[-1].isalnum() and all(c.isdigit() or c in ".xabcdef" for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: local-use IPv4/IPv6 translation
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")  # every public IPv6 address; the rest is special-use
# IPv6 prefixes whose last 32 bits are an IPv4 address: RFC 6052's well-known NAT64 prefix, RFC 4291's
# deprecated IPv4-compatible addresses (::a.b.c.d; :: is judged as 0.0.0.0, ::1 as the loopback it is),
# and SIIT's IPv4-translated addresses (::ffff:0:a.b.c.d, RFC 2765).
_IPV4_CARRIERS = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries: mapped (::ffff:a.b.c.d), 6to4, NAT64, IPv4-compatible or
    SIIT; Teredo is not here (2001::/32 is not global, so it is refused as it is)."""
    embedded = address.ipv4_mapped or address.sixtofour
    if embedded is None and any(address in net for net in _IPV4_CARRIERS):
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return embedded


def internal_host(host: str) -> str | None:
    """Why a URL host is inside the network (loopback, private, link-local, ...), or None."""
    host = host.lower().rstrip(".").strip("[]")
    if host in _INTERNAL_NAMES or host.endswith(_INTERNAL_SUFFIXES):
        return "a local or internal name"
    address = _address(host)
    if address is None:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return "a private or reserved address"
        # An IPv4 address carried in IPv6 is judged as that IPv4 address: a NAT64 gateway or a dual-stack
        # host takes these to it.
        embedded = None if address.is_loopback else _embedded_ipv4(address)
        if embedded is not None:
            address = embedded
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if not address.is_global or address.is_multicast:
        return "a private or reserved address"
    if isinstance(address, ipaddress.IPv6Address) and address not in _GLOBAL_UNICAST:
        # Python calls some special-use IPv6 space global (the rest of ::/8, for one); no public host is there.
        return "a private or reserved address"
    return None


def _host_allowed(host: str, allowed: list[str]) -> bool:
    for entry in allowed:
        if entry == "*" or entry == host or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


def _url_refusal(url: str, policy: ImageUrlPolicy) -> str | None:
    """Why `url` may not be sent upstream under `policy`, or None."""
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "data":
        return None if policy.allow_data else "data: URLs are not accepted here"
    if scheme not in ("https", "http"):
        return f"the scheme {scheme[:16]!r} is not accepted (data: or https:)"
    if scheme == "http" and not policy.allow_http:
        return "plain http:// URLs are not accepted (use https:// or a data: URL)"
    # Anything parsers disagree on (a backslash, userinfo, whitespace or controls, percent-escapes in
    # the host) is refused rather than read one way here and another by the fetching upstream.
    if not rest.startswith("//") or _UNSAFE_URL_CHAR.search(url):
        return "the URL is malformed"
    try:
        parts = urlsplit(url)  # raises on a bracketed host that is no IPv6 address ([::ffff:127.1])
    except ValueError:
        return "the URL is malformed"
    if "@" in parts.netloc:
        return "URLs with credentials are not accepted"
    host = (parts.hostname or "").rstrip(".")
    try:
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        return "the URL's port is malformed"
    # A bracketed host must be an IPv6 address this check can read (not an IPvFuture [v1.x] literal).
    bracketed = ":" in host and parts.netloc.startswith("[") and _address(host) is not None
    if not host or not (HOST_NAME.fullmatch(host) or bracketed):
        return "the URL's host is malformed"
    reason = internal_host(host)
    if reason:
        return f"its host is {reason}"
    if not _host_allowed(host, policy.allowed_hosts):
        return (
            f"the host {host!r} is not on this gateway's allow-list"
            if policy.allowed_hosts
            else "only data: URLs are accepted here"
        )
    return None


def _check_urls(i: int, content: list[Any], policy: ImageUrlPolicy) -> None:
    for j, part in enumerate(content):
        if part.type not in _URL_PARTS:
            continue
        media = (part.model_extra or {}).get(part.type)
        url = media.get("url") if isinstance(media, dict) else media
        if not isinstance(url, str):
            continue  # image_url's shape is the schema's to check; other kinds carry no URL to fetch
        reason = _url_refusal(url, policy)
        if reason:
            param = f"messages[{i}].content[{j}].{part.type}.url"
            raise InvalidRequest(
                f"The {part.type} in messages[{i}] (content part {j}) is not allowed: {reason}.",
                param=param,
                code="url_not_allowed",
            )


def validate_chat(obj: dict[str, Any], limits: ValidationLimits) -> ChatCompletionRequest:
    request: ChatCompletionRequest = _validate(obj, ChatCompletionRequest)
    if len(request.messages) > limits.max_messages:
        raise InvalidRequest(
            f"'messages' has {len(request.messages)} entries; at most {limits.max_messages} are allowed.",
            param="messages",
            code="too_many_messages",
        )
    total = 0
    for i, message in enumerate(request.messages):
        chars = _content_chars(message.content)
        if chars > limits.max_message_chars:
            raise InvalidRequest(
                f"'messages[{i}].content' has {chars} characters; at most "
                f"{limits.max_message_chars} are allowed per message.",
                param=f"messages[{i}].content",
                code="message_too_long",
            )
        total += chars
        if type(message.content) is list:
            _check_urls(i, message.content, limits.image_urls)
    if total > limits.max_total_chars:
        raise InvalidRequest(
            f"'messages' hold {total} characters in all; at most {limits.max_total_chars} are allowed.",
            param="messages",
            code="messages_too_long",
        )
    _normalise_lengths(obj, request, limits)
    _bound_choices(obj, request, limits)
    return request


def validate_completion(obj: dict[str, Any], limits: ValidationLimits) -> CompletionRequest:
    request: CompletionRequest = _validate(obj, CompletionRequest)
    prompt = request.prompt
    prompts = prompt_count(prompt)
    # A token id counts as one character toward max_total_chars: without the model's tokenizer that is the
    # least text an id can stand for, and a prompt of ids is then bounded like one of text.
    ids = not isinstance(prompt, str) and bool(prompt) and not isinstance(prompt[0], str)
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        length = len(prompt)  # a string, or one prompt of token ids
    else:
        # strings, or lists of token ids: validation made the list one or the other, so no item is an int
        length = sum(len(p) for p in cast("list[str] | list[list[int]]", prompt))
    if length > limits.max_total_chars:
        what = "token ids" if ids else "characters"
        raise InvalidRequest(
            f"'prompt' has {length} {what}; at most {limits.max_total_chars} are allowed.",
            param="prompt",
            code="prompt_too_long",
        )
    _normalise_lengths(obj, request, limits)
    _bound_choices(obj, request, limits, prompts)
    return request


def validate_embedding(obj: dict[str, Any], limits: ValidationLimits) -> EmbeddingRequest:
    request: EmbeddingRequest = _validate(obj, EmbeddingRequest)
    data = request.input
    if isinstance(data, list) and data and not isinstance(data[0], int) and len(data) > limits.max_embedding_inputs:
        raise InvalidRequest(
            f"'input' has {len(data)} items; at most {limits.max_embedding_inputs} are allowed.",
            param="input",
            code="too_many_inputs",
        )
    return request


def moderation_inputs(obj: dict[str, Any], limits: ValidationLimits) -> list[str]:
    """The texts of a /v1/moderations request, in order (images are not something our moderators read)."""
    request: ModerationRequest = _validate(obj, ModerationRequest)
    items = [request.input] if isinstance(request.input, str) else request.input
    if len(items) > limits.max_embedding_inputs:
        raise InvalidRequest(
            f"'input' has {len(items)} items; at most {limits.max_embedding_inputs} are allowed.",
            param="input",
            code="too_many_inputs",
        )
    texts: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, ModerationImageInput):
            raise InvalidRequest(
                "Image inputs cannot be moderated by this gateway; send text.",
                param=f"input[{i}]",
                code="unsupported_input",
            )
        text = item if isinstance(item, str) else item.text
        if len(text) > limits.max_message_chars:
            raise InvalidRequest(
                f"'input' item {i} has {len(text)} characters; at most {limits.max_message_chars} are allowed.",
                param=f"input[{i}]",
                code="input_too_long",
            )
        texts.append(text)
    return texts
