"""hostd's side of the VCN dataplane: plugging NICs into this host's vswitch, and the network
part of the switchover hook.

At the pause (QEMU's pre-switchover), for each VNIC: take the source vswitch's pause marker (it
holds the VNIC's ingress from now on), copy the final flow state to the destination vswitch, and
release the destination's held ingress above the marker. The destination QEMU is not running yet,
but everything released now arrived after the source paused, so the kernel socket hands the
resumed guest exactly the frames it has not seen. All of it is a few local HTTP calls: the pause
includes them, so nothing else may happen here.
"""

from __future__ import annotations

import contextlib
import logging

import httpx
from pydantic import BaseModel

from livemig.errors import HostUnreachable, InvalidRequest, LivemigError
from livemig.faults import fault_point
from livemig.model.vm import NicDevice, VmSpec
from livemig.network.envelope import MEDIA_TYPE

log = logging.getLogger(__name__)


class VnicHandoff(BaseModel):
    """One VNIC moving with the VM: its id and the destination host's vswitch."""

    vnic: str
    destination_vswitch: str


def vswitch_nics(spec: VmSpec) -> list[NicDevice]:
    return [d for d in spec.devices if isinstance(d, NicDevice) and d.backend == "vswitch"]


class VswitchPorts:
    """Attach and detach this host's vswitch ports for a VM's NICs (async, hostd's event loop)."""

    def __init__(self, url: str | None) -> None:
        self.url = url.rstrip("/") if url else None
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        # one long-lived client with keep-alive: a fresh client per call costs tens of ms (TLS
        # context, connect), and the hand-off runs inside the guest's pause
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=10)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def warm_up(self, handoffs: list[VnicHandoff]) -> None:
        """Open the connections the hand-off will use, before the pause rather than inside it."""
        for url in {self.url, *(h.destination_vswitch for h in handoffs)}:
            if url:
                with contextlib.suppress(LivemigError):
                    await self._call("GET", f"{url.rstrip('/')}/healthz")

    async def _call(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        try:
            reply = await self.client.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.HTTPError as exc:
            raise HostUnreachable(f"vswitch {url} did not answer: {exc!r}") from exc
        if reply.status_code >= 400:
            raise LivemigError(f"vswitch {url}: {reply.text}")
        return reply

    async def attach(self, spec: VmSpec, *, hold: bool) -> dict[str, str]:
        """``-netdev`` arguments per NIC id; ``hold`` for a migration destination (not yet running)."""
        nics = vswitch_nics(spec)
        if not nics:
            return {}
        if self.url is None:
            raise InvalidRequest(f"VM {spec.name} has vswitch NICs but this hostd has no --vswitch")
        netdevs: dict[str, str] = {}
        for nic in nics:
            with contextlib.suppress(LivemigError):  # a leftover port from an earlier attempt
                await self._call("DELETE", f"{self.url}/vnics/{nic.vnic}")
            port = (await self._call("POST", f"{self.url}/vnics", json={"vnic_id": nic.vnic, "hold": hold})).json()
            netdevs[nic.id] = (
                f"dgram,id=net_{nic.id},local.type=inet,local.host=127.0.0.1,local.port={port['qemu_port']},"
                f"remote.type=inet,remote.host=127.0.0.1,remote.port={port['switch_port']}"
            )
        return netdevs

    async def detach(self, spec: VmSpec) -> None:
        if self.url is None:
            return
        for nic in vswitch_nics(spec):
            with contextlib.suppress(LivemigError):
                await self._call("DELETE", f"{self.url}/vnics/{nic.vnic}")

    async def hand_off(self, handoffs: list[VnicHandoff]) -> dict[str, dict[str, int]]:
        """Inside the pause: marker, final flows, release on the destination. Returns the markers."""
        assert self.url is not None
        markers: dict[str, dict[str, int]] = {}
        for h in handoffs:
            marker = (await self._call("POST", f"{self.url}/vnics/{h.vnic}/pause-marker")).json()["marker"]
            markers[h.vnic] = marker
            dest = h.destination_vswitch.rstrip("/")
            if not await fault_point("hostd.flow_sync"):  # "hold" = the test switch: no final flows
                flows = (await self._call("GET", f"{self.url}/vnics/{h.vnic}/flows", params={"since": 0})).content
                await self._call("POST", f"{dest}/vnics/{h.vnic}/flows", content=flows,
                                 headers={"content-type": MEDIA_TYPE})  # fmt: skip
            await self._call("POST", f"{dest}/vnics/{h.vnic}/resume", json={"marker": marker})
        return markers

    async def release_here(self, markers: dict[str, dict[str, int]]) -> None:
        """The migration failed after the hand-off: the source runs again, give it its ingress back."""
        if self.url is None:
            return
        for vnic, marker in markers.items():
            with contextlib.suppress(LivemigError):
                await self._call("POST", f"{self.url}/vnics/{vnic}/resume", json={"marker": marker})
