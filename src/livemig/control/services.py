"""What the LMO's API routes and its controller share: the store and the clients to every service.

One object built at start-up (``api.create_app``) instead of closures over loose variables, so
each group of routes reads on its own and the controller uses the very same clients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import httpx
from fastapi import Depends, Request

from livemig.control.network import NetworkService
from livemig.control.store import Store
from livemig.control.transfers import TransferOps
from livemig.control.volumes import VolumeOps
from livemig.errors import InvalidRequest
from livemig.wire.blockd import BlockdClient
from livemig.wire.hostd import HostdClient


@dataclass
class Services:
    store: Store
    http: httpx.AsyncClient
    volumes: VolumeOps
    network: NetworkService
    transfers: TransferOps

    @classmethod
    def build(cls, store: Store, http: httpx.AsyncClient, blockd_url: str | None = None) -> Services:
        block = BlockdClient(blockd_url, http) if blockd_url else None
        volumes = VolumeOps(store, block)
        return cls(store, http, volumes, NetworkService(store, http), TransferOps(volumes))

    def host(self, name: str) -> HostdClient:
        """The hostd of a registered host (NotFound for an unknown one)."""
        return HostdClient(self.store.host(name), self.http)

    def hosts(self) -> dict[str, HostdClient]:
        return {reg.name: HostdClient(reg, self.http) for reg in self.store.hosts()}

    @property
    def block(self) -> BlockdClient:
        if self.volumes.block is None:
            raise InvalidRequest("the LMO runs without blockd (start it with --blockd URL)")
        return self.volumes.block


def get_services(request: Request) -> Services:
    """FastAPI dependency: the LMO's services, built once in the app's lifespan."""
    services = request.app.state.services
    assert isinstance(services, Services)
    return services


#: what a route declares to receive the services
ServicesDep = Annotated[Services, Depends(get_services)]
