"""Issue 17, point 8: uploads are bounded per principal (files, bytes, uploads in progress), streamed to
storage without the file ever being held whole in the gateway's memory, and expired files are gone for
readers at once and deleted by the sweep.
"""

from __future__ import annotations

import io
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from procs import (
    Proc,
    gateway_config,
    http_get,
    new_key,
    openai_client,
    start_gateway,
    wait_until,
)

MIB = 1024 * 1024


def _jsonl(n: int, pad: int = 0) -> bytes:
    items = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "x" * pad + str(i)}], "max_tokens": 4},
        }
        for i in range(n)
    ]
    return b"\n".join(orjson.dumps(x) for x in items) + b"\n"


def _upload(client: openai.OpenAI, content: bytes) -> Any:
    return client.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")


@pytest.fixture(scope="module")
def gw(sim: Proc, module_tmp: Path) -> Iterator[Proc]:
    """The default batch limits (only the runner's poll is quick): what a default key gets."""
    proc = start_gateway(gateway_config({"m": [sim.url]}, batch={"poll_s": 0.1}), module_tmp, ready_path="/readyz")
    yield proc
    proc.stop()


def test_a_principal_cannot_store_files_without_end(gw: Proc) -> None:
    """A default key stores at most 100 files (the default): the 101st upload is refused, until one is
    deleted; another principal is unaffected."""
    hoarder = openai_client(gw, new_key(gw, user="hoarder", tier="free"))
    small = _jsonl(1)
    stored = []
    for _ in range(101):
        try:
            stored.append(_upload(hoarder, small).id)
        except openai.BadRequestError as exc:
            assert exc.body["code"] == "file_quota_exceeded" and exc.body["param"] == "file", exc.body
            break
    assert len(stored) == 100, f"a default key stored {len(stored)} files with no limit"
    assert _upload(openai_client(gw, new_key(gw, user="neighbour", tier="free")), small).id  # quotas are per principal
    hoarder.files.delete(stored[0])
    assert _upload(hoarder, small).id  # a deleted file frees its place


def _rss_peak(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux: "reset the peak RSS")


def test_a_50_mib_upload_is_streamed_not_held(gw: Proc) -> None:
    """While a 50 MiB file is uploaded the gateway's peak RSS grows by a bounded few MiB (the build before
    held the body, a joined copy, the decoded text and the split lines: several times the file), and the
    stored file reads back byte for byte."""
    pid = gw.popen.pid
    client = openai_client(gw)
    _upload(client, _jsonl(10))  # warm: imports, connections, the first spool file
    content = _jsonl(40_000, pad=1_160)
    assert 49 * MIB < len(content) < 51 * MIB
    _reset_peak(pid)
    base, _ = _rss_peak(pid)
    started = time.perf_counter()
    file = _upload(client, content)
    took = time.perf_counter() - started
    _, peak = _rss_peak(pid)
    growth = peak - base
    print(f"upload of {len(content) / MIB:.1f} MiB: peak RSS +{growth / MIB:.1f} MiB in {took:.2f} s")
    assert file.bytes == len(content)
    assert growth < 24 * MIB, f"the gateway's peak RSS grew by {growth / MIB:.1f} MiB for a 50 MiB upload"
    _reset_peak(pid)
    base, _ = _rss_peak(pid)
    assert client.files.content(file.id).content == content
    _, peak = _rss_peak(pid)
    print(f"download: peak RSS +{(peak - base) / MIB:.1f} MiB")
    assert peak - base < 24 * MIB, f"the gateway's peak RSS grew by {(peak - base) / MIB:.1f} MiB for a download"
    client.files.delete(file.id)


def _stalled_upload(gw: Proc, key: str) -> socket.socket:
    """An upload whose headers and first bytes are sent and whose rest never comes."""
    sock = socket.create_connection(("127.0.0.1", gw.port))
    head = (
        "POST /v1/files HTTP/1.1\r\nhost: x\r\n"
        f"authorization: Bearer {key}\r\ncontent-type: multipart/form-data; boundary=b\r\n"
        f"content-length: {10 * MIB}\r\n\r\n"
        '--b\r\ncontent-disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
    )
    sock.sendall(head.encode())
    return sock


def test_parallel_uploads_of_one_principal_are_bounded(gw: Proc) -> None:
    """Uploads in progress hold a spool file and a request each, and the stored-bytes quota only sees
    finished ones: a principal gets 2 at once (the default); the next is refused with 429 while they hang."""
    key = new_key(gw, user="parallel", tier="free")
    client = openai_client(gw, key)
    stalled = [_stalled_upload(gw, key) for _ in range(2)]
    try:

        def refused() -> bool:
            try:
                _upload(client, _jsonl(1))
            except openai.RateLimitError as exc:
                assert exc.body["code"] == "too_many_uploads", exc.body
                return True
            return False

        wait_until(refused, timeout=5, interval=0.05, what="an upload beyond 2 in progress to be refused")
    finally:
        for sock in stalled:
            sock.close()
    wait_until(lambda: _try_upload(client), timeout=5, what="uploads to be accepted once the stalled ones ended")


def _try_upload(client: openai.OpenAI) -> bool:
    try:
        return bool(_upload(client, _jsonl(1)).id)
    except openai.RateLimitError:
        return False


def test_expired_files_are_gone_at_once_and_swept(sim: Proc, module_tmp: Path, reaper: Any) -> None:
    """With file_ttl_s 3: a file reads back until it expires, is 404 from then on (the build before served
    it until its once-a-minute sweep), and its rows are deleted by the sweep."""
    gw = reaper(
        start_gateway(
            gateway_config({"m": [sim.url]}, batch={"poll_s": 0.1, "file_ttl_s": 3}), module_tmp, ready_path="/readyz"
        )
    )
    client = openai_client(gw)
    file = _upload(client, _jsonl(2))
    assert file.expires_at is not None
    status, _ = http_get(f"{gw.url}/v1/files/{file.id}/content")
    assert status == 200

    def gone() -> bool:
        return http_get(f"{gw.url}/v1/files/{file.id}/content")[0] == 404

    wait_until(gone, timeout=file.expires_at - time.time() + 3, what="the expired file to be unreadable")
    assert time.time() >= file.expires_at - 1  # (not gone before its time: expires_at is whole seconds)
    assert http_get(f"{gw.url}/v1/files/{file.id}")[0] == 404
    assert file.id not in [f["id"] for f in orjson.loads(http_get(f"{gw.url}/v1/files")[1])["data"]]

    path = gw.database_url.split("///", 1)[1]

    def swept() -> bool:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT count(*) FROM files WHERE id = ?", (file.id,)).fetchone()[0] == 0

    wait_until(swept, timeout=10, interval=0.2, what="the sweep to delete the expired file")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM file_chunks WHERE file_id = ?", (file.id,)).fetchone()[0] == 0


def test_a_principal_cannot_store_bytes_without_end(sim: Proc, module_tmp: Path, reaper: Any) -> None:
    """With max_bytes_per_owner 64 KiB: a file that would pass it is refused with 413 as soon as the stream
    passes what is left (a declared length over it never gets read), and deleting a file makes room."""
    gw = reaper(
        start_gateway(
            gateway_config({"m": [sim.url]}, batch={"max_bytes_per_owner": 65536}), module_tmp, ready_path="/readyz"
        )
    )
    client = openai_client(gw, new_key(gw, user="bulky", tier="free"))
    content = _jsonl(240)
    assert 30_000 < len(content) < 40_000
    first = _upload(client, content)
    with pytest.raises(openai.APIStatusError) as info:
        _upload(client, content)
    assert info.value.status_code == 413 and info.value.body["code"] == "file_quota_exceeded", info.value.body
    client.files.delete(first.id)
    assert _upload(client, content).bytes == len(content)
