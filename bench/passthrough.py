"""The bare pass-through baseline: uvicorn + uvloop + httptools + aiohttp + orjson, nothing else.

It parses the request body once (as any proxy that reads the model must), forwards it over a pooled
aiohttp session, and returns the upstream's body. The gateway is measured against this.
Run: python bench/passthrough.py --upstream http://127.0.0.1:PORT --port PORT
"""

from __future__ import annotations

import argparse

import aiohttp
import orjson
import uvicorn


def make_app(upstream: str):
    session: aiohttp.ClientSession | None = None

    async def app(scope, receive, send):
        nonlocal session
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024))
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        payload = orjson.loads(body)
        async with session.post(
            upstream + scope["path"], data=orjson.dumps(payload), headers={"content-type": "application/json"}
        ) as resp:
            answer = await resp.read()
            status = resp.status
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": answer})

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        make_app(args.upstream),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
    )
