"""Hosts: machines that hold fewer models at once than they serve (docs/llama-server.md, "Many models on few
GPUs"). A llama-server in router mode (router.py) or one llama-server process per model started by the gateway
(launch.py); either way the gateway's scheduler (schedule.py) owns when a model loads and unloads, so a request
never evicts a model that is serving, and the swaps are few.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from portcullis.hosts.launch import Launcher, free_port
from portcullis.hosts.router import RouterDriver
from portcullis.hosts.schedule import Driver, Host, Seat
from portcullis.routing.catalog import ReplicaState

if TYPE_CHECKING:
    from portcullis.config import Config
    from portcullis.exchange import Exchange
    from portcullis.offpeak import OffPeak
    from portcullis.routing.catalog import Catalog


def make_hosts(
    config: Config, catalog: Catalog, *, offpeak: OffPeak | None, priority_of: Callable[[Exchange], int]
) -> dict[str, Host]:
    """Each configured host with a seat for every model deployed on it (a launched model's port chosen here)."""
    hosts: dict[str, Host] = {}
    for name, conf in config.hosts.items():
        seats: list[Seat] = []
        commands: dict[str, list[str]] = {}
        for model, mconf in config.models.items():
            for dep, replica in zip(mconf.deployments, catalog.models[model], strict=True):
                if dep.host != name:
                    continue
                if conf.kind == "launch":
                    assert dep.command is not None
                    commands[model] = list(dep.command)
                    listen = conf.listen_host
                    replica.url = (
                        f"http://[{listen}]:{free_port(listen)}"
                        if ":" in listen
                        else (f"http://{listen}:{free_port(listen)}")
                    )
                    replica.state = ReplicaState.READY  # it can be started: its process's health is the host's work
                replica.loaded = False
                seats.append(Seat(model=model, upstream=replica.upstream_model or model, replica=replica))
        driver: Driver
        if conf.kind == "router":
            assert conf.url is not None
            api_key = next((s.replica.api_key for s in seats if s.replica.api_key), None)
            driver = RouterDriver(conf.url, api_key, config.health)
        else:
            driver = Launcher(name, conf, commands)
        hosts[name] = Host(name, conf, seats, driver, offpeak=offpeak, priority_of=priority_of)
    return hosts
