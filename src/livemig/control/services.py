"""What the LMO's API routes and its controller share: the store and the clients to every service.

One object built at start-up (``api.create_app``) instead of closures over loose variables, so
each group of routes reads on its own and the controller uses the very same clients. (When the
controller runs on its own thread it has its own ``Services``, with its own HTTP client, over the
same store and the same cache of host registrations.)
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from livemig.control.network import NetworkService
from livemig.control.store import Store
from livemig.control.transfers import TransferOps
from livemig.control.volumes import VolumeOps
from livemig.errors import InvalidRequest
from livemig.model.host import HostRegistration
from livemig.wire.base import AsyncHttp
from livemig.wire.blockd import BlockdClient
from livemig.wire.hostd import HostdClient

#: how long a host's registration is reused before the store is asked again: this replica forgets
#: at once the registrations it records itself and any host that did not answer; another replica's
#: news reaches it within this time
REGISTRATION_TTL_S = 30.0


class Registrations:
    """Hosts' registrations as last read from the store (the controller calls hosts thousands of
    times a pass; a host's address rarely changes). Shared by the API and the controller."""

    def __init__(self, store: Store, ttl_s: float = REGISTRATION_TTL_S) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._cached: dict[str, tuple[float, HostRegistration]] = {}

    def get(self, name: str) -> HostRegistration:
        """NotFound for an unknown host."""
        now = time.monotonic()
        cached = self._cached.get(name)
        if cached is not None and now - cached[0] < self.ttl_s:
            return cached[1]
        registration = self.store.host(name)
        self._cached[name] = (now, registration)
        return registration

    def remember(self, registration: HostRegistration) -> None:
        """A registration the caller has just read from the store (with the rows it needed anyway)."""
        self._cached[registration.name] = (time.monotonic(), registration)

    def prefetch(self, names: Iterable[str]) -> None:
        """Read the registrations of ``names`` not held (or held too long) in one query: a pass
        about to call a thousand hosts makes one round trip instead of one per host it has not
        called for ``ttl_s`` (each on the controller's loop). Unknown hosts are left to ``get``."""
        now = time.monotonic()
        stale = {n for n in names if n not in self._cached or now - self._cached[n][0] >= self.ttl_s}
        if stale:
            for registration in self.store.hosts_named(stale).values():
                self._cached[registration.name] = (now, registration)

    def forget(self, name: str) -> None:
        self._cached.pop(name, None)


@dataclass
class Services:
    store: Store
    http: AsyncHttp
    volumes: VolumeOps
    network: NetworkService
    registrations: Registrations
    transfers: TransferOps
    #: ask hosts to encrypt every migration stream (QEMU's TLS with tls-authz); off only in an
    #: ``--insecure`` region or with ``livemig lmo --no-migration-tls``
    migration_tls: bool = True

    @classmethod
    def build(cls, store: Store, http: AsyncHttp, blockd_url: str | None = None,
              registrations: Registrations | None = None) -> Services:  # fmt: skip
        block = BlockdClient(blockd_url, http) if blockd_url else None
        volumes = VolumeOps(store, block)
        return cls(store, http, volumes, NetworkService(store, http), registrations or Registrations(store),
                   TransferOps(volumes))  # fmt: skip

    def registration(self, name: str) -> HostRegistration:
        """A registered host's address and facts (NotFound for an unknown one)."""
        return self.registrations.get(name)

    def forget(self, name: str) -> None:
        """A host re-registered, changed, or did not answer: read it from the store next time."""
        self.registrations.forget(name)

    def host(self, name: str) -> HostdClient:
        """The hostd of a registered host (NotFound for an unknown one)."""
        return HostdClient(self.registration(name), self.http)

    def hosts(self) -> dict[str, HostdClient]:
        return {reg.name: HostdClient(reg, self.http) for reg in self.store.hosts()}

    @property
    def block(self) -> BlockdClient:
        if self.volumes.block is None:
            raise InvalidRequest("the LMO runs without blockd (start it with --blockd URL)")
        return self.volumes.block


async def get_services(request: Request) -> Services:
    """FastAPI dependency: the LMO's services, built once in the app's lifespan."""
    services = request.app.state.services
    assert isinstance(services, Services)
    return services


#: what a route declares to receive the services
ServicesDep = Annotated[Services, Depends(get_services)]
