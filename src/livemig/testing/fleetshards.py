"""The fleet simulator split over processes (``livemig sim --shards N``): each shard serves a
contiguous slice of the hosts on its own port, and a migration between hosts of two shards
streams from one process's simulated QEMU to the other's.

Why: one process serves every simulated host on one event loop, so a request to any host waits
behind the requests to all the others (a wave's thousand migrations observed by the LMO). Real
hosts answer independently; shards come closer to that, and use more than one core.

A shard knows every other shard's address from the base port (shard ``j`` listens on
``port + j``) and which shard a migration URI's host belongs to from its address (each simulated
host has its own, ``address_of``). The source's shard reads the destination's handshake (alive,
capabilities, parameters, TLS objects) from the destination's shard, and asks it to resume the
guest when the last state is sent: the two points where QEMU's own stream meets the destination.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from livemig.errors import NotFound
from livemig.testing.fakeqemu import FakeQemu, QemuWorld, StreamEnd, append_qemu_log, tls_creds_of
from livemig.wire.base import AsyncHttp

#: the routes one shard answers for the others
STREAMS = "/sim/streams"


def address_of(index: int) -> str:
    """The migration address of the fleet's host number ``index`` (unique per host)."""
    return f"127.100.{index // 250}.{index % 250 + 1}"


def index_of(address: str) -> int | None:
    """The host number whose address this is, or None (not a simulated host's)."""
    parts = address.split(".")
    if len(parts) != 4 or parts[:2] != ["127", "100"] or not all(p.isdigit() for p in parts[2:]):
        return None
    return int(parts[2]) * 250 + int(parts[3]) - 1


@dataclass(frozen=True)
class ShardMap:
    """Which shard serves which of ``hosts`` hosts, and where each shard listens."""

    hosts: int
    shards: int
    host: str  # the address every shard listens on
    base_port: int  # shard j listens on base_port + j

    def indices(self, shard: int) -> range:
        """The host numbers shard ``shard`` serves: a contiguous slice, sizes within one."""
        return range(shard * self.hosts // self.shards, (shard + 1) * self.hosts // self.shards)

    def shard_of(self, index: int) -> int:
        return next(s for s in range(self.shards) if index in self.indices(s))

    def url(self, shard: int) -> str:
        return f"http://{self.host}:{self.base_port + shard}"

    def peer_of(self, uri: str) -> int | None:
        """The shard serving the host a migration URI (``tcp:ADDRESS:PORT``) names, or None."""
        parts = uri.split(":")
        index = index_of(parts[1]) if len(parts) == 3 and parts[0] == "tcp" else None
        return self.shard_of(index) if index is not None and 0 <= index < self.hosts else None


class StreamHandshake(BaseModel):
    """What a source learns of a destination listening in another shard."""

    alive: bool
    capabilities: dict[str, bool]
    parameters: dict[str, Any]
    objects: dict[str, dict[str, Any]]
    qemu_log: str


class RemoteQemu:
    """A destination QEMU of another shard, as a source's stream reaches it (a ``StreamEnd``)."""

    def __init__(self, uri: str, peer: str, http: AsyncHttp, handshake: StreamHandshake) -> None:
        self.uri, self.peer, self.http = uri, peer, http
        self.alive = handshake.alive
        self.capabilities = handshake.capabilities
        self.parameters = handshake.parameters
        self.objects = handshake.objects
        self._log = Path(handshake.qemu_log)

    def tls_creds(self) -> dict[str, Any] | None:
        return tls_creds_of(self.objects, self.parameters)

    def log(self, line: str) -> None:
        """Its ``-D`` log is a file on this machine: written here, as its QEMU would."""
        append_qemu_log(self._log, line)

    async def accept(self) -> bool:
        """Hand over the last state. False when it cannot have arrived: the destination, or its whole
        shard, is gone (the source then fails and runs its guest again, as QEMU's does when its
        socket breaks). When the shard was reached but its answer was lost, the state was written,
        as far as a source can tell: QEMU's completes then, and whether the destination runs is
        for the LMO to find out from it (it holds a destination that never finishes loading)."""
        try:
            reply = await self.http.request("POST", f"{self.peer}{STREAMS}/accept", params={"uri": self.uri})
        except (httpx.ConnectError, aiohttp.ClientConnectorError):
            return False
        except (TimeoutError, httpx.HTTPError, aiohttp.ClientError):
            return True
        return reply.status_code == 200


class ShardStreams:
    """A shard's way to the destinations the other shards serve (``QemuWorld.remote``)."""

    def __init__(self, shards: ShardMap, shard: int) -> None:
        self.shards, self.shard = shards, shard
        self.http: AsyncHttp | None = None  # set once the shard's client exists (``serve``)

    async def connect(self, uri: str) -> StreamEnd | None:
        peer = self.shards.peer_of(uri)
        if peer is None or peer == self.shard or self.http is None:
            return None  # not a host of another shard: refused, as a port nobody listens on
        url = self.shards.url(peer)
        try:
            reply = await self.http.request("GET", f"{url}{STREAMS}", params={"uri": uri})
        except Exception:  # the shard is gone: as a connection refused
            return None
        if reply.status_code != 200:
            return None
        return RemoteQemu(uri, url, self.http, StreamHandshake.model_validate(reply.json()))


def add_stream_routes(app: FastAPI, world: QemuWorld) -> None:
    """The two points of a stream another shard's source needs from this shard's destinations."""

    def listening(uri: str) -> FakeQemu:
        qemu = world.listening.get(uri)
        if qemu is None:
            raise NotFound(f"no simulated QEMU listens at {uri}", uri=uri)
        return qemu

    @app.get(STREAMS)
    async def handshake(uri: str) -> StreamHandshake:
        qemu = listening(uri)
        return StreamHandshake(alive=qemu.alive, capabilities=qemu.capabilities, parameters=qemu.parameters,
                               objects=qemu.objects, qemu_log=str(qemu.paths.qemu_log))  # fmt: skip

    @app.post(f"{STREAMS}/accept")
    async def accept(uri: str) -> dict[str, bool]:
        return {"accepted": await listening(uri).accept()}
