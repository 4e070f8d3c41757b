"""Which answers to a native request (the Responses or Messages API's own endpoint) say the server lacks the
endpoint, so that the replica is asked in chat completions from then on, and which are about the request."""

from __future__ import annotations

from portcullis.errors import GatewayError, NotFound
from portcullis.upstream.client import upstream_error
from portcullis.upstream.proxy import _lacks


def test_an_unknown_endpoint_is_learned() -> None:
    llama = b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}'
    assert _lacks(upstream_error(404, llama, model="m"))
    assert _lacks(upstream_error(404, b'{"detail":"Not Found"}', model="m"))  # vLLM, FastAPI
    assert _lacks(upstream_error(404, b"", model="m"))
    assert _lacks(GatewayError("Method Not Allowed", status=405))


def test_a_model_the_server_does_not_have_is_not_an_endpoint_it_lacks() -> None:
    # llama-server's router mode, or a proxy in front of several servers: the request's model, not the endpoint.
    assert not _lacks(upstream_error(404, b'{"error":{"code":404,"message":"model is not found"}}', model="m"))
    assert not _lacks(upstream_error(404, b'{"error":{"message":"model qwen not found"}}', model="m"))
    assert not _lacks(NotFound("No such model", code="model_not_found"))
    assert not _lacks(upstream_error(501, b'{"error":{"message":"Infill is not supported by this model"}}', model="m"))


def test_a_lacking_endpoint_is_tried_again_after_a_while() -> None:
    """A server upgraded in place (or a proxy that was rolling out) gets its native requests back."""
    from portcullis.routing.catalog import NATIVE_RETRY_S, Replica

    replica = Replica(model="m", name="r", url="http://x", kind="llama_cpp", upstream_model=None, weight=1)
    replica.native = {"/v1/messages"}
    assert replica.speaks("/v1/messages", 100.0)
    replica.lacks("/v1/messages", 100.0)
    assert not replica.speaks("/v1/messages", 100.0 + NATIVE_RETRY_S - 1)
    assert replica.speaks("/v1/messages", 100.0 + NATIVE_RETRY_S)
    assert replica.speaks("/v1/messages", 100.0 + NATIVE_RETRY_S + 1)
    replica.lacks("/v1/responses", 100.0)  # never configured native: nothing to take back
    assert not replica.speaks("/v1/responses", 100.0 + 2 * NATIVE_RETRY_S)
