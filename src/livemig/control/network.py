"""The LMO as the VCN's mapping service: it stores VCNs, subnets, VNICs and security lists, tells
every vswitch where each VNIC lives, and moves a VNIC's flow state during a migration.

Dual ingress is part of the mapping: while a migration of a VM with VNICs is between
``SyncingFlows`` and ``CuttingOver``, its VNICs' ingress goes to both the source and the
destination; the destination vswitch holds it until the switchover hook (in the source hostd)
releases exactly what arrived after the source paused.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from typing import Any

from pydantic import BaseModel, ValidationError

from livemig.control.store import Store
from livemig.errors import Conflict, InvalidRequest, LivemigError, NotFound
from livemig.faults.points import fault_point
from livemig.model.host import HostRegistration
from livemig.model.migration import Migration, Phase
from livemig.model.vm import NicDevice, VmSpec
from livemig.network.model import Mapping, OverlayHost, SecurityList, Subnet, Vcn, Vnic
from livemig.wire import vswitch
from livemig.wire.base import AsyncHttp
from livemig.wire.vswitch import AsyncVswitchClient

log = logging.getLogger(__name__)

KINDS: dict[str, type[BaseModel]] = {"vcns": Vcn, "subnets": Subnet, "vnics": Vnic, "security-lists": SecurityList}
DUAL_INGRESS_PHASES = frozenset({Phase.SYNCING_FLOWS, Phase.PRECOPY, Phase.SWITCHOVER, Phase.CUTTING_OVER})


def vm_vnics(spec: VmSpec) -> list[str]:
    return [d.vnic for d in spec.devices if isinstance(d, NicDevice) and d.backend == "vswitch" and d.vnic]


class NetworkService:
    def __init__(self, store: Store, client: AsyncHttp) -> None:
        self.store = store
        self.client = client

    # ------------------------------------------------------------------ objects
    def objects(self, kind: str) -> list[Any]:
        model = KINDS[kind]
        return [model.model_validate_json(doc) for doc in self.store.netobjects(kind)]

    def get(self, kind: str, object_id: str) -> Any:
        for obj in self.objects(kind):
            if obj.id == object_id:
                return obj
        raise NotFound(f"unknown {kind.rstrip('s')} {object_id!r}")

    def put(self, kind: str, obj: Any) -> None:
        """Store ``obj`` if the whole topology stays consistent (else a clear 422)."""
        current = {k: {o.id: o for o in self.objects(k)} for k in KINDS}
        current[kind][obj.id] = obj
        self._validate(current)
        self.store.put_netobject(kind, obj.id, obj.model_dump_json())

    def delete(self, kind: str, object_id: str) -> None:
        self.get(kind, object_id)
        users = {
            "vcns": [s.id for s in self.objects("subnets") if s.vcn == object_id],
            "subnets": [v.id for v in self.objects("vnics") if v.subnet == object_id],
            "security-lists": [v.id for v in self.objects("vnics") if object_id in v.security_lists],
            "vnics": [spec.name for spec, _ in self.store.vms() if object_id in vm_vnics(spec)],
        }[kind]
        if users:
            raise Conflict(f"{kind.rstrip('s')} {object_id!r} is used by {', '.join(users)}")
        self.store.delete_netobject(kind, object_id)

    def _validate(self, current: dict[str, dict[str, Any]]) -> None:
        lists = set(current["security-lists"])
        for vnic in current["vnics"].values():
            if missing := [s for s in vnic.security_lists if s not in lists]:
                raise InvalidRequest(f"VNIC {vnic.id!r} names unknown security lists {missing}")
        placed = [v for v in current["vnics"].values() if v.host]
        hosts = {v.host for v in placed}
        try:
            Mapping(generation=0, hosts=[OverlayHost(name=h, overlay=f"127.0.0.{i + 1}:4789")
                                         for i, h in enumerate(sorted(hosts))],
                    vcns=list(current["vcns"].values()), subnets=list(current["subnets"].values()),
                    vnics=placed)  # fmt: skip
        except ValidationError as exc:
            raise InvalidRequest(f"inconsistent network: {exc.errors()[0].get('msg', exc)}") from None
        for vnic in current["vnics"].values():
            subnet = current["subnets"].get(vnic.subnet)
            if subnet is None:
                raise InvalidRequest(f"VNIC {vnic.id!r} names unknown subnet {vnic.subnet!r}")
            if ipaddress.IPv4Address(vnic.ip) not in ipaddress.IPv4Network(subnet.cidr):
                raise InvalidRequest(f"VNIC {vnic.id!r} ip {vnic.ip} is outside subnet {subnet.id} ({subnet.cidr})")

    # ------------------------------------------------------------------ VMs
    def guest_boot_args(self, spec: VmSpec) -> str:
        """Kernel arguments that give the guest workload its VNIC's address (first vswitch NIC)."""
        nics = [d for d in spec.devices if isinstance(d, NicDevice) and d.backend == "vswitch"]
        for nic in nics:
            vnic = self.get("vnics", nic.vnic or "")
            if vnic.mac != nic.mac:
                raise InvalidRequest(f"NIC {nic.id} has MAC {nic.mac} but VNIC {vnic.id} has {vnic.mac}")
        if not nics:
            return ""
        vnic = self.get("vnics", nics[0].vnic or "")
        subnet = self.get("subnets", vnic.subnet)
        prefix = ipaddress.IPv4Network(subnet.cidr).prefixlen
        return f"livemig.ip={vnic.ip}/{prefix} livemig.gw={subnet.gateway}"

    def place(self, vnic_ids: list[str], host: str) -> None:
        for vnic_id in vnic_ids:
            vnic = self.get("vnics", vnic_id)
            if vnic.host != host:
                self.store.put_netobject("vnics", vnic.id, vnic.model_copy(update={"host": host}).model_dump_json())

    # ------------------------------------------------------------------ mapping
    def mapping(self, in_flight: list[Migration]) -> Mapping:
        hosts = [h for h in self.store.hosts() if h.overlay]
        names = {h.name for h in hosts}
        vnics = [v for v in self.objects("vnics") if v.host in names]
        ingress: dict[str, list[str]] = {}
        for m in in_flight:
            if m.phase in DUAL_INGRESS_PHASES and m.source in names and m.destination in names:
                spec, _ = self.store.vm(m.vm)
                for vnic in vm_vnics(spec):
                    if any(v.id == vnic for v in vnics):
                        ingress[vnic] = [m.source, m.destination]
        return Mapping(generation=time.time_ns() // 1000, hosts=[OverlayHost(name=h.name, overlay=h.overlay or "")
                                                                for h in hosts],
                       vcns=self.objects("vcns"), subnets=self.objects("subnets"), vnics=vnics,
                       ingress=ingress)  # fmt: skip

    async def push(self, in_flight: list[Migration] | None = None) -> Mapping:
        """Send the security lists and the mapping to every vswitch."""
        if in_flight is None:
            in_flight = self.store.migrations(active_only=True)
        mapping = self.mapping(in_flight)
        lists = self.objects("security-lists")
        for host in self.store.hosts():
            if not host.vswitch_url:
                continue
            switch = self.switch(host)
            for security_list in lists:
                await switch.run(vswitch.put_security_list(security_list))
            await switch.run(vswitch.put_mapping(mapping))
        return mapping

    async def push_best_effort(self) -> None:
        """Push after an API change: a vswitch that does not answer now gets the mapping on the
        next push (the next change, migration step or restart), so the request still succeeds."""
        try:
            await self.push()
        except LivemigError as exc:
            log.warning("mapping push incomplete: %s", exc.message)

    async def copy_flows(self, vnic: str, source: HostRegistration, destination: HostRegistration,
                         since: int = 0) -> tuple[int, int]:  # fmt: skip
        """Copy a VNIC's conntrack entries changed after the source's version ``since`` (0: all);
        returns (how many the destination imported, the source's version they bring it to).

        The fault point ``lmo.flow_sync=hold`` skips it: the test switch that proves the copy matters.
        """
        if await fault_point("lmo.flow_sync"):
            return 0, since
        exported = await self.switch(source).run(vswitch.export_flows(vnic, since))
        report = await self.switch(destination).run(vswitch.import_flows(vnic, exported.envelope))
        return report.imported, exported.version

    def switch(self, host: HostRegistration) -> AsyncVswitchClient:
        if not host.vswitch_url:
            raise InvalidRequest(f"host {host.name} has no vswitch")
        return AsyncVswitchClient(host.vswitch_url, self.client, who=f"vswitch of {host.name}")
