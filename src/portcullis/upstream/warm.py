"""Warm restarts: the KV cache of a model's most used system prompts, saved on the replica's disk and restored into
its slots when it comes back (DeploymentConfig.warm_restart; llama-server started with --slot-save-path).

A llama-server that restarts has empty slots: the first request of every conversation and of every long system
prompt pays its whole prefill again. The gateway sees which system prompts its requests share (the leading system
messages, counted per model when at least `min_chars` long), and every `save_every_s` it primes one slot per
prompt (the `prefixes` most used, into slots 0, 1, ...) with a one-token request carrying that prompt and
`id_slot`, then asks the server to save the slot (`POST /slots/{id}?action=save`). When the replica is ready again
after being down, it restores each saved slot (`POST /slots/{id}?action=restore`) before traffic finds it cold:
llama-server then reuses that prefix as if it had computed it. Files are named by the prompt's hash
(`portcullis-<hash>.bin`) in the server's --slot-save-path; they stay there.

Priming takes a slot for a moment (one token) and replaces what that slot held; it is a side call like /tokenize,
counted in the replica's in-flight requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import OrderedDict
from typing import Any

from portcullis.config import Config, WarmRestartConfig
from portcullis.obs.logging import get_logger
from portcullis.routing.catalog import Catalog, Replica, ReplicaState, SideCall
from portcullis.routing.context import content_text

log = get_logger("portcullis.warm")

_TRACKED = 256  # system prompts counted per model at most (least recently seen forgotten first)


class WarmRestarts:
    def __init__(self, config: Config, catalog: Catalog, call: SideCall) -> None:
        self.call = call
        self.replicas: dict[str, list[Replica]] = {}  # model → its replicas with warm_restart
        self.settings: dict[Replica, WarmRestartConfig] = {}
        for model, mconf in config.models.items():
            for dep, replica in zip(mconf.deployments, catalog.models[model], strict=True):
                if dep.warm_restart is not None and dep.kind == "llama_cpp" and dep.host is None:
                    self.replicas.setdefault(model, []).append(replica)
                    self.settings[replica] = dep.warm_restart
        self.counts: dict[str, OrderedDict[str, tuple[int, list[dict[str, Any]]]]] = {
            m: OrderedDict() for m in self.replicas
        }
        self.saved: dict[Replica, list[tuple[int, str]]] = {}  # what each replica has on its disk, by slot
        self.saves = 0
        self.restores = 0
        self._task: asyncio.Task[None] | None = None
        self._restoring: set[asyncio.Task[None]] = set()
        self._away: set[Replica] = set()  # seen not ready since it was last ready

    @property
    def enabled(self) -> bool:
        return bool(self.replicas)

    def observe(self, model: str, payload: dict[str, Any]) -> None:
        """A request for `model`: count its leading system messages (cheap: a model without warm restarts returns
        at once)."""
        counts = self.counts.get(model)
        if counts is None:
            return
        messages = payload.get("messages")
        if not isinstance(messages, list):
            return
        system = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer"):
                break
            system.append({"role": m["role"], "content": content_text(m.get("content"))})
        text = "".join(m["content"] for m in system)
        if len(text) < min(s.min_chars for s in (self.settings[r] for r in self.replicas[model])):
            return
        key = hashlib.blake2b(f"{model}\x1f{text}".encode(), digest_size=12).hexdigest()
        seen = counts.get(key)
        counts[key] = (seen[0] + 1 if seen else 1, system)
        counts.move_to_end(key)
        while len(counts) > _TRACKED:
            counts.popitem(last=False)

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._save_loop())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._restoring) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _save_loop(self) -> None:
        every = min(s.save_every_s for s in self.settings.values())
        while True:
            await asyncio.sleep(every)
            for model, replicas in self.replicas.items():
                for replica in replicas:
                    if replica.state is ReplicaState.READY:
                        try:
                            await self.save(model, replica)
                        except Exception as exc:  # the next round tries again
                            log.warning("warm_save_failed", model=model, replica=replica.name, error=repr(exc))

    async def save(self, model: str, replica: Replica) -> None:
        """Prime and save the replica's slots with the model's most used system prompts."""
        settings = self.settings[replica]
        top = sorted(self.counts[model].items(), key=lambda kv: kv[1][0], reverse=True)
        top = top[: min(settings.prefixes, max(1, replica.slots))]
        saved = []
        name = replica.upstream_model or model
        for slot, (key, (_, system)) in enumerate(top):
            filename = f"portcullis-{key}.bin"
            prime = {
                "model": name,
                "messages": [*system, {"role": "user", "content": "."}],
                "max_tokens": 1,
                "id_slot": slot,
                "cache_prompt": True,
            }
            status, _ = await self.call(replica, "/v1/chat/completions", prime, model=model, timeout_s=60)
            if status != 200:
                raise RuntimeError(f"priming slot {slot} answered {status}")
            status, _ = await self.call(
                replica, f"/slots/{slot}?action=save", {"filename": filename}, model=model, timeout_s=60
            )
            if status != 200:
                raise RuntimeError(f"saving slot {slot} answered {status} (is --slot-save-path set?)")
            saved.append((slot, filename))
        if saved:
            self.saves += len(saved)
            self.saved[replica] = saved
            log.info("warm_saved", model=model, replica=replica.name, slots=len(saved))

    def changed(self, replica: Replica) -> None:
        """The prober saw the replica change state: ready again after being down, warming or unknown (a restart,
        most likely: a restarting llama-server answers 503 while it loads), it gets its saved slots back."""
        if replica.state is not ReplicaState.READY:
            self._away.add(replica)
            return
        if replica in self._away and replica in self.saved:
            self._away.discard(replica)
            task = asyncio.get_running_loop().create_task(self._restore(replica))
            self._restoring.add(task)
            task.add_done_callback(self._restoring.discard)

    async def _restore(self, replica: Replica) -> None:
        restored = 0
        for slot, filename in self.saved.get(replica, ()):
            with contextlib.suppress(Exception):
                status, _ = await self.call(
                    replica, f"/slots/{slot}?action=restore", {"filename": filename}, model=replica.model, timeout_s=60
                )
                restored += status == 200
        self.restores += restored
        log.info("warm_restored", model=replica.model, replica=replica.name, slots=restored)
