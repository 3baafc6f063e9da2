"""The VCN dataplane of one host: a userspace virtual switch, built for live migration.

Attaching a VM
--------------
``POST /vnics {"vnic_id": ...}`` binds the VNIC's *switch port*, a UDP socket on 127.0.0.1, and
picks the *QEMU port* (``qemu_port`` in the request, or a free one); the reply
(:class:`~livemig.network.model.Attachment`) names both. The switch port accepts datagrams from
the QEMU port only (``ports.py``), and sends the VNIC's ingress there. One datagram is one
Ethernet frame, both ways. hostd (``host/vnics.py``) creates QEMU's side itself: a UDP socket
bound to the QEMU port and connected to the switch port, which QEMU inherits as ``-netdev
dgram,id=net_<nic>,local.type=fd,local.str=<fd>`` next to ``-device virtio-net-pci,...,mac=<vnic
mac>`` (``host/qemu.py``). hostd keeps a duplicate of that socket: at the pause it drains the
frames the stopped QEMU never read (``handoff.py``). Whatever else binds the QEMU port plugs in
the same way: the fake VMs of tests and benchmarks (``fakevm.py``), or a QEMU started by hand with
the ``local.type=inet`` form ``Attachment.netdev()`` spells. As root, ``{"tap": name}`` attaches
a tap device instead (``gateway.py``).

Pipeline (in the event loop, no locks)
--------------------------------------
The full path (the first packets of every flow, and every frame the fast path below does not
take). From a VM: parse (malformed → counted, dropped) → anti-spoofing (source MAC and IP must
be the VNIC's) → ARP requests are *answered* from the mapping (a VNIC of the same subnet, or the
subnet's gateway; nothing is ever flooded), and so is DHCP (``dhcp.py``: the VNIC's IP, mask,
gateway) → IPv4 to the gateway MAC is **routed** within the VCN (MACs rewritten to the
destination subnet's gateway and the destination VNIC, TTL decremented, header checksum redone);
IPv4 to a VNIC MAC of the same subnet is **switched** → the VNIC's *egress* security lists with
its conntrack → delivery to every host in the target's ingress set: locally, or as VXLAN (VNI of
the VCN) to that host's overlay endpoint. VCNs are isolated because every lookup is keyed by the
VNI: a MAC, IP or VNI of another VCN simply does not resolve. Not carried: IPv6,
multicast/broadcast (other than ARP and DHCP, answered locally), IPv4 fragments (counted as
``dropped_fragment``), ICMP errors as "related" traffic (they need a rule).

From the overlay: the sender must be a host of the mapping (by outer source address); the inner
frame goes to the local VNIC with that MAC in that VNI, through its *ingress* gate and security
lists. Frames arriving for a VNIC this host does not serve are dropped and counted.

The fast path (``flowcache.py``): once a flow's decision is known, the rest of its packets are
looked up by a key read straight from the frame (port, MACs, VNI, addresses, ports...) and skip
the parsing, the lookups and the security-list evaluation; they still go through the per-packet
checks the full path would fail them on, the conntrack refresh, the sequence stamp, the ingress
gate and every counter. Any change of mapping, security lists, attachments, holding, imported
flows or a flow's own conntrack entry sends the next packet down the full path again.

Dual ingress and the pause marker
---------------------------------
While VNIC X migrates from S to D, the mapping says ``ingress[X] = [S, D]``. Every vswitch that
sends a frame to X (including S and D themselves) then sends it to *both*, stamped with the same
**sequence number** from its own per-X counter. The number rides in VXLAN's reserved bits (32 bits:
bytes 1-3 and 7 of the header; a local copy carries it in memory), so the packets stay decodable
by tshark and need no extra header. Sequence numbers are per *(sender host, X)*, so the marker
is a map ``{sender host: last sequence}``.

* D attaches X with ``hold: true``: X's ingress on D waits in the vswitch's own bounded buffer.
* At the pause (QEMU's pre-switchover hook), ``POST /vnics/X/pause-marker`` on S makes S hold
  X's ingress from then on and returns, per sender, the last sequence S processed for X: every
  stamped frame up to there has been handed to the (now paused) VM or denied by its lists.
* When X runs on D, ``POST /vnics/X/resume {"marker": ...}`` on D releases, in arrival order,
  the held frames with a sequence above the marker (and unstamped ones, which only D received);
  everything at or below it is a duplicate of what S processed. Nothing lost, nothing twice — as
  far as the vswitch can know: frames QEMU itself had queued but not yet put into guest memory
  when it paused are QEMU's to lose (TCP retransmits them). The marker stays as a floor for a
  grace period, so a straggling stamped copy is still dropped as a duplicate.
* Cancel after the marker: ``POST /vnics/X/resume`` on S with S's own marker releases what S held;
  with the marker hostd lowered and ``replay_recent``, S first re-sends, from its memory of the
  last frames it wrote, the ones the paused QEMU never passed to the guest.
  ``DELETE /vnics/X`` (on D after a cancel, on S after success) drops the port, X's flows, its
  buffer, and this host from X's ingress set.

Held frames are filtered at *release*, after the final conntrack delta (taken in the pause) has
been imported, so they see the flow state of the moment the VM resumes.

Flow state moves with ``GET /vnics/X/flows?since=v`` (an envelope: a full export for ``since=0``,
then deltas) and ``POST /vnics/X/flows`` on the other side; see ``conntrack.py`` and ``envelope.py``.

Ordering caveats, documented rather than hidden: a sender vswitch restarted in the middle of a
migration window restarts its counters (the LMO should cancel such a migration); UDP reordering
between a sender and S can make S count a frame as processed that it never saw.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from livemig.errors import Conflict, InvalidRequest, NotFound
from livemig.network import dhcp
from livemig.network.conntrack import Conntrack
from livemig.network.envelope import open_flows, seal_flows
from livemig.network.flowcache import (
    DEFAULT_SIZE,
    TCP_STATE_FLAGS,
    CachedFlow,
    EgressFlow,
    FlowCache,
    FrameKey,
    OverlayFlow,
    OverlayKey,
    Verdict,
    cacheable_ipv4,
    frame_key,
    intact,
    overlay_key,
)
from livemig.network.gateway import TapPort
from livemig.network.handoff import PAUSE_PROBE, RECENT_DELIVERIES, Admission, IngressGate, Sequencer
from livemig.network.model import FlowBatch, Mapping, SecurityList
from livemig.network.packets import (
    ARP_REPLY,
    ARP_REQUEST,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Arp,
    Ethernet,
    FlowInfo,
    IPv4,
    MalformedPacket,
    Udp,
    Vxlan,
    decrement_ttl,
    flow_info,
    ip_to_int,
    mac_to_bytes,
    routed_frame,
    vxlan_header,
    vxlan_seq,
)
from livemig.network.ports import OverlaySocket, Port, UdpPort, open_overlay, open_udp_port
from livemig.network.seclist import DENY_ALL, RuleSet, evaluate
from livemig.wire.vswitch import (
    Attachment,
    AttachRequest,
    CounterSnapshot,
    Delivery,
    HandoffReport,
    HandoffRequest,
    ImportReport,
    PauseMarker,
    ResumeReport,
)

log = logging.getLogger(__name__)
SWEEP_INTERVAL_S = 5.0
_MIN_FRAME = 60
_BROADCAST_IP = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SubnetView:
    id: str
    vni: int
    gateway_ip: int
    gateway_mac: bytes
    mask: int


@dataclass(frozen=True, slots=True)
class VnicView:
    id: str
    mac: bytes
    ip: int
    vni: int
    subnet: SubnetView
    security_lists: tuple[str, ...]
    ingress_hosts: tuple[str, ...]


@dataclass(slots=True)
class Topology:
    """A mapping compiled into the dictionaries the data path looks frames up in (all keyed by VNI)."""

    mapping: Mapping
    vnics: dict[str, VnicView] = field(default_factory=dict)
    by_mac: dict[tuple[int, bytes], VnicView] = field(default_factory=dict)
    by_ip: dict[tuple[int, int], VnicView] = field(default_factory=dict)
    hosts: dict[str, tuple[str, int]] = field(default_factory=dict)
    host_by_addr: dict[tuple[str, int], str] = field(default_factory=dict)

    @classmethod
    def compile(cls, mapping: Mapping) -> Topology:
        topo = cls(mapping)
        vni_of = {v.id: v.vni for v in mapping.vcns}
        subnets = {
            s.id: SubnetView(
                s.id, vni_of[s.vcn], ip_to_int(s.gateway), mac_to_bytes(s.mac), int(IPv4Network(s.cidr).netmask)
            )
            for s in mapping.subnets
        }
        for host in mapping.hosts:
            topo.hosts[host.name] = host.address
            topo.host_by_addr[host.address] = host.name
        for vnic in mapping.vnics:
            sub = subnets[vnic.subnet]
            view = VnicView(
                vnic.id,
                mac_to_bytes(vnic.mac),
                ip_to_int(vnic.ip),
                sub.vni,
                sub,
                tuple(vnic.security_lists),
                tuple(mapping.ingress_hosts(vnic)),
            )
            topo.vnics[view.id] = view
            topo.by_mac[(view.vni, view.mac)] = view
            topo.by_ip[(view.vni, view.ip)] = view
        return topo


@dataclass(slots=True)
class LocalVnic:
    """A VNIC attached on this host: its port, its ingress gate, its counters."""

    vnic_id: str
    port: Port
    gate: IngressGate
    attachment: Attachment
    counters: Counter[str] = field(default_factory=Counter)
    # the last frames written to QEMU's socket, oldest first: the hand-off needs to know which of
    # them a paused QEMU never read (see ``handoff.replay_marker``), and a failed hand-off gives
    # those back to the source (``resume`` with ``replay_recent``), so their bytes are kept too
    recent: deque[tuple[str, int, float, bytes]] = field(default_factory=lambda: deque(maxlen=RECENT_DELIVERIES))

    def send(self, frame: bytes, sender: str = "", seq: int = 0) -> None:
        """Hand one frame to the VM's QEMU and remember it (``seq`` 0: not stamped)."""
        self.port.send(frame)
        self.recent.append((sender, seq, time.time(), frame))  # a tuple: this runs for every frame


class Vswitch:
    """One host's switch. Feed it frames (``vm_frame``, ``overlay_datagram``); it forwards them."""

    def __init__(
        self,
        host_name: str,
        overlay_listen: str = "127.0.0.1:4789",
        hold_frames: int = 8192,
        hold_bytes: int = 16 * 1024 * 1024,
        flow_cache_size: int = DEFAULT_SIZE,
    ) -> None:
        """``flow_cache_size``: flows each of the two caches (from VMs, from the overlay) holds; 0 turns
        the fast path off, so every frame takes the full path."""
        self.name = host_name
        self.overlay_listen = overlay_listen
        self.hold_frames = hold_frames
        self.hold_bytes = hold_bytes
        self.topology = Topology.compile(Mapping(generation=0))
        self.security_lists: dict[str, SecurityList] = {}
        self.conntrack = Conntrack()
        self.sequencer = Sequencer()
        self.locals: dict[str, LocalVnic] = {}
        self.counters: Counter[str] = Counter()
        self.overlay: OverlaySocket | None = None
        self._rules: dict[str, RuleSet] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.vm_flows: FlowCache[FrameKey, EgressFlow] = FlowCache("vm", flow_cache_size)
        self.overlay_flows: FlowCache[OverlayKey, OverlayFlow] = FlowCache("overlay", flow_cache_size)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.overlay = await open_overlay(self.overlay_listen, self.overlay_datagram)
        self._sweeper = asyncio.create_task(self._sweep_forever())
        log.info("vswitch %s: overlay on %s", self.name, self.overlay.endpoint)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for vnic_id in list(self.locals):
            self.detach(vnic_id)
        if self.overlay is not None:
            self.overlay.close()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.conntrack.sweep()

    @property
    def overlay_endpoint(self) -> str:
        return self.overlay.endpoint if self.overlay is not None else self.overlay_listen

    # -- control plane ----------------------------------------------------------------------

    def set_mapping(self, mapping: Mapping) -> None:
        """Replace the topology (a newer generation, or the same one unchanged)."""
        current = self.topology.mapping
        if mapping.generation < current.generation or (
            mapping.generation == current.generation and current.generation and mapping != current
        ):
            raise Conflict(
                f"mapping generation {mapping.generation} is older than (or conflicts with) "
                f"generation {current.generation} already applied"
            )
        self.topology = Topology.compile(mapping)
        self._rules.clear()
        self._flows_changed()

    def set_security_list(self, security_list: SecurityList) -> None:
        self.security_lists[security_list.id] = security_list
        self._rules.clear()
        self._flows_changed()

    def delete_security_list(self, list_id: str) -> None:
        if self.security_lists.pop(list_id, None) is None:
            raise NotFound(f"security list {list_id!r} is unknown")
        self._rules.clear()
        self._flows_changed()

    def _flows_changed(self) -> None:
        """Forget every cached flow decision: what it was made from (mapping, lists, ports, gates,
        flow state) has changed. The next packet of each flow takes the full path."""
        self.vm_flows.clear()
        self.overlay_flows.clear()

    def rules(self, view: VnicView) -> RuleSet:
        rules = self._rules.get(view.id)
        if rules is None:
            lists = [self.security_lists[i] for i in view.security_lists if i in self.security_lists]
            rules = self._rules[view.id] = RuleSet.of(lists) if lists else DENY_ALL
        return rules

    def view(self, vnic_id: str) -> VnicView:
        view = self.topology.vnics.get(vnic_id)
        if view is None:
            raise NotFound(
                f"VNIC {vnic_id!r} is not in the mapping (generation "
                f"{self.topology.mapping.generation}) of vswitch {self.name}"
            )
        return view

    def local(self, vnic_id: str) -> LocalVnic:
        local = self.locals.get(vnic_id)
        if local is None:
            raise NotFound(f"VNIC {vnic_id!r} is not attached to vswitch {self.name}")
        return local

    async def attach(self, request: AttachRequest) -> Attachment:
        """Plug a VNIC of the mapping into this host (idempotent for the same request)."""
        self.view(request.vnic_id)
        existing = self.locals.get(request.vnic_id)
        if existing is not None:
            if request.qemu_port not in (None, existing.attachment.qemu_port) or request.tap != existing.attachment.tap:
                raise Conflict(f"VNIC {request.vnic_id!r} is already attached differently: {existing.attachment}")
            return existing.attachment
        port: Port
        if request.tap:
            port = TapPort(request.vnic_id, request.tap, self.vm_frame)
            attachment = Attachment(vnic_id=request.vnic_id, kind="tap", tap=request.tap, holding=request.hold)
        else:
            udp: UdpPort = await open_udp_port(request.vnic_id, self.vm_frame, request.qemu_port)
            port = udp
            attachment = Attachment(
                vnic_id=request.vnic_id,
                kind="udp",
                switch_port=udp.switch_port,
                qemu_port=udp.qemu_addr[1],
                holding=request.hold,
            )
        self.plug(port, attachment)
        log.info("vswitch %s: attached %s", self.name, attachment)
        return attachment

    def plug(self, port: Port, attachment: Attachment) -> None:
        """Connect an opened port for ``attachment.vnic_id`` (the seam tests use with fake ports)."""
        gate = IngressGate(holding=attachment.holding, max_frames=self.hold_frames, max_bytes=self.hold_bytes)
        self.locals[attachment.vnic_id] = LocalVnic(attachment.vnic_id, port, gate, attachment)
        self._flows_changed()

    def attachment(self, vnic_id: str) -> Attachment:
        local = self.local(vnic_id)
        return local.attachment.model_copy(update={"holding": local.gate.holding})

    def detach(self, vnic_id: str) -> bool:
        """Forget a VNIC here: its port, flows, held frames, and this host from its ingress set.

        Idempotent (a controller retries after a crash); returns whether a port was attached.
        """
        local = self.locals.pop(vnic_id, None)
        if local is not None:
            local.port.close()
        self.conntrack.remove_vnic(vnic_id)
        self._flows_changed()
        mapping = self.topology.mapping
        targets = mapping.ingress.get(vnic_id)
        if targets and self.name in targets:
            ingress = dict(mapping.ingress)
            rest = [t for t in targets if t != self.name]
            if rest:
                ingress[vnic_id] = rest
            else:
                del ingress[vnic_id]
            self.topology = Topology.compile(mapping.model_copy(update={"ingress": ingress}))
            self._rules.clear()
        return local is not None

    # -- migration surface ------------------------------------------------------------------

    def export_flows(self, vnic_id: str, since: int = 0) -> tuple[FlowBatch, bytes]:
        """The VNIC's flows changed after ``since`` (all for 0), and the same sealed in an envelope."""
        self.view(vnic_id)
        batch = self.conntrack.export_delta(vnic_id, since)
        return batch, seal_flows(batch)

    def import_flows(self, vnic_id: str, envelope: bytes) -> ImportReport:
        batch = open_flows(envelope)
        if batch.vnic != vnic_id:
            raise InvalidRequest(f"envelope carries flows of VNIC {batch.vnic!r}, not {vnic_id!r}")
        self.view(vnic_id)
        imported, removed = self.conntrack.import_batch(batch)
        self._flows_changed()
        return ImportReport(
            vnic_id=vnic_id, imported=imported, removed=removed, version=self.conntrack.table(vnic_id).version
        )

    def pause_marker(self, vnic_id: str, flows_since: int | None = None) -> PauseMarker:
        """Start holding the VNIC's ingress here; the marker says what was processed before.

        ``recent`` lists the last frames written to QEMU's socket, so that the caller, who can see
        how many of them the paused QEMU never read, can lower the marker below those. With
        ``flows_since``, the reply also carries the flows changed after that version: with
        ingress held and the guest paused, this is the VNIC's final flow state.
        """
        local = self.local(vnic_id)
        marker = local.gate.hold()
        self._flows_changed()
        local.port.send(PAUSE_PROBE)  # tells hostd whether the stopped QEMU parked a frame (handoff.py)
        recent = [Delivery(sender=sender, seq=seq, at=at) for sender, seq, at, _ in local.recent]
        if flows_since is None:
            return PauseMarker(vnic_id=vnic_id, marker=marker, recent=recent)
        batch, envelope = self.export_flows(vnic_id, max(0, flows_since))
        return PauseMarker(vnic_id=vnic_id, marker=marker, recent=recent,
                           flows=base64.b64encode(envelope).decode("ascii"), flows_version=batch.version)  # fmt: skip

    def hand_over(self, vnic_id: str, request: HandoffRequest) -> HandoffReport:
        """The destination's half of the pause: the final flows first (so the released frames meet
        the moved connection state), then the held ingress above the marker."""
        imported = None
        if request.flows is not None:
            try:
                envelope = base64.b64decode(request.flows, validate=True)
            except binascii.Error:
                raise InvalidRequest(f"VNIC {vnic_id}: the hand-off's flows are not base64") from None
            imported = self.import_flows(vnic_id, envelope)
        return HandoffReport(vnic_id=vnic_id, flows=imported, resume=self.resume(vnic_id, request.marker))

    def resume(self, vnic_id: str, marker: dict[str, int], replay_recent: bool = False) -> ResumeReport:
        """Release held ingress newer than ``marker`` through the VNIC's ingress filter.

        ``replay_recent`` (the source after a failed hand-off, with the marker hostd lowered below
        the frames its paused QEMU never passed on): first write those again, from ``recent``, in
        their order, so the guest that runs on here gets them instead of nobody."""
        local = self.local(vnic_id)
        view = self.view(vnic_id)
        replayed = 0
        if replay_recent:
            for sender, seq, _at, frame in list(local.recent):
                if seq and seq > marker.get(sender, seq):
                    local.port.send(frame)
                    replayed += 1
            local.counters["replayed"] += replayed
        release = local.gate.resume(marker)
        self._flows_changed()
        delivered = denied = 0
        for held in release.frames:
            if self._filter_ingress(view, local, held.frame, None, held.sender, held.seq):
                delivered += 1
            else:
                denied += 1
        local.counters["released"] += delivered
        local.counters["duplicates"] += release.duplicates_skipped
        local.counters["lost_to_overflow"] += release.lost_to_overflow
        return ResumeReport(
            vnic_id=vnic_id,
            replayed=replayed,
            delivered=delivered,
            duplicates_skipped=release.duplicates_skipped,
            denied=denied,
            lost_to_overflow=release.lost_to_overflow,
        )

    def snapshot_counters(self) -> CounterSnapshot:
        vnics: dict[str, dict[str, int]] = {}
        for vnic_id, local in self.locals.items():
            merged = Counter(local.counters) + local.port.counters
            merged["held"] = local.gate.held
            merged["held_bytes"] = local.gate.held_bytes
            merged["overflowed"] = local.gate.overflowed
            merged["flows"] = len(self.conntrack.table(vnic_id))
            vnics[vnic_id] = dict(merged)
        if self.overlay is not None:
            for key, value in self.overlay.counters.items():
                self.counters[f"overlay_{key}"] = value
        switch = {**self.counters, **self.vm_flows.stats(), **self.overlay_flows.stats()}
        return CounterSnapshot(host=self.name, switch=switch, vnics=vnics)

    # -- data path: from a VM ---------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        self.counters["dropped"] += 1
        self.counters[f"dropped_{reason}"] += 1

    def vm_frame(self, vnic_id: str, data: bytes) -> None:
        """A frame a local VM (or tap) sent: forwarded by its flow's cached decision, or the full path."""
        self.counters["rx_vm"] += 1
        key = frame_key(vnic_id, data) if self.vm_flows.max_entries else None
        if key is not None:
            flow = self.vm_flows.flows.get(key)
            if flow is not None and self._egress_cached(flow, data):
                return
            self.vm_flows.misses += 1
        self._vm_frame_full(vnic_id, data, key)

    def _egress_cached(self, flow: EgressFlow, data: bytes) -> bool:
        """Forward ``data`` by ``flow``; False, having done nothing, when the cached decision may not hold."""
        proto = flow.proto
        if not intact(data, 14, proto) or (proto == IPPROTO_TCP and data[47] & TCP_STATE_FLAGS):
            return False
        now = self.conntrack.clock()
        if not flow.egress.renew(now):
            return False
        self.vm_flows.hits += 1
        source = flow.source
        source.counters["rx"] += 1
        if flow.head:
            frame = routed_frame(flow.head, data)
            self.counters["routed"] += 1
        else:
            frame = data
        source.counters["forwarded"] += 1
        target = flow.target
        seq = self.sequencer.next(target.id) if flow.stamp else 0
        for here, addr in flow.hops:
            if here:
                self._ingress_cached(flow, frame, self.name, seq, now)
            elif addr is None or self.overlay is None:
                self._drop("no_overlay_route")
            else:
                self.overlay.sendto((vxlan_header(target.vni, seq) if seq else flow.vxlan) + frame, addr)
                self.counters["overlay_tx"] += 1
        return True

    def _vm_frame_full(self, vnic_id: str, data: bytes, key: FrameKey | None) -> None:
        view = self.topology.vnics.get(vnic_id)
        local = self.locals.get(vnic_id)
        if view is None or local is None:
            self._drop("unknown_vnic")
            return
        local.counters["rx"] += 1
        try:
            eth = Ethernet.parse(data)
            if eth.src != view.mac:
                self._drop("spoofed_mac")
            elif eth.ethertype == ETHERTYPE_IPV4:
                self._egress_ipv4(view, local, eth, data, key)
            elif eth.ethertype == ETHERTYPE_ARP:
                self._answer_arp(view, local, eth)
            else:
                self._drop("unsupported_ethertype")
        except MalformedPacket:
            self.counters["malformed"] += 1
            self._drop("malformed")

    def _answer_arp(self, view: VnicView, local: LocalVnic, eth: Ethernet) -> None:
        arp = Arp.parse(eth.payload)
        if arp.op != ARP_REQUEST:
            self._drop("arp_not_request")
            return
        if arp.spa not in (view.ip, 0) or arp.sha != view.mac:
            self._drop("spoofed_arp")
            return
        subnet = view.subnet
        if arp.tpa == subnet.gateway_ip:
            mac = subnet.gateway_mac
        else:
            target = self.topology.by_ip.get((view.vni, arp.tpa))
            if target is None or target.subnet is not subnet or target is view:
                self._drop("arp_unanswered")
                return
            mac = target.mac
        reply = Arp(ARP_REPLY, mac, arp.tpa, arp.sha, arp.spa).pack()
        local.send(Ethernet(eth.src, mac, ETHERTYPE_ARP, reply).pack().ljust(_MIN_FRAME, b"\x00"))
        self.counters["arp_replies"] += 1

    def _egress_ipv4(self, view: VnicView, local: LocalVnic, eth: Ethernet, data: bytes, key: FrameKey | None) -> None:
        ip = IPv4.parse(eth.payload)
        if ip.proto == IPPROTO_UDP and ip.src in (0, view.ip) and ip.dst in (_BROADCAST_IP, view.subnet.gateway_ip):
            udp = Udp.parse(ip.payload)
            if udp.dport == dhcp.DHCP_SERVER_PORT:
                self._answer_dhcp(view, local, udp.payload)
                return
        if ip.src != view.ip:
            self._drop("spoofed_ip")
            return
        if ip.is_fragment:
            self._drop("fragment")
            return
        info = flow_info(ip)
        subnet = view.subnet
        if eth.dst == subnet.gateway_mac:
            target = self.topology.by_ip.get((view.vni, ip.dst))
            if target is None:
                self._drop("no_route")
                return
            routed = decrement_ttl(eth.payload[: 20 + len(ip.options) + len(ip.payload)])  # no Ethernet padding
            if routed is None:
                self._drop("ttl_exceeded")
                return
            frame = target.mac + target.subnet.gateway_mac + b"\x08\x00" + routed
            self.counters["routed"] += 1
        else:
            target = self.topology.by_mac.get((view.vni, eth.dst))
            if target is None or target.subnet is not subnet:
                self._drop("unknown_destination")
                return
            if ip.dst != target.ip:
                self._drop("ip_mac_mismatch")
                return
            frame = data  # switched: the frame goes on untouched
        table = self.conntrack.table(view.id)
        decision, entry = evaluate(table, self.rules(view), info, egress=True)
        if not decision.allowed:
            self.counters["denied_egress"] += 1
            local.counters["denied_egress"] += 1
            self._drop("denied")
            if key is not None:
                self.vm_flows.discard(key)
            return
        local.counters["forwarded"] += 1
        flow = None
        if key is not None:
            verdict = Verdict.of(table, decision, entry, info) if not ip.options and target is not view else None
            if verdict is None:
                self.vm_flows.discard(key)  # an entry for this key no longer holds: the next packet decides again
            else:
                flow = self._egress_flow(local, target, frame is not data, verdict, ip.proto)
                self.vm_flows.put(key, flow)
        self._deliver(target, frame, info, flow)

    def _egress_flow(
        self, source: LocalVnic, target: VnicView, routed: bool, verdict: Verdict, proto: int
    ) -> EgressFlow:
        """What the full path just did with a frame, as the cache keeps it for the flow's next frames."""
        hosts = target.ingress_hosts
        return EgressFlow(
            target=target,
            local=self.locals.get(target.id),
            proto=proto,
            ingress=None,  # filled when a frame of the flow passes the target's gate here
            source=source,
            egress=verdict,
            head=target.mac + target.subnet.gateway_mac + b"\x08\x00" if routed else b"",
            stamp=len(hosts) > 1,
            hops=tuple((host == self.name, self.topology.hosts.get(host)) for host in hosts),
            vxlan=vxlan_header(target.vni),
        )

    def _answer_dhcp(self, view: VnicView, local: LocalVnic, payload: bytes) -> None:
        request = dhcp.parse(payload)
        if request.chaddr != view.mac:
            self._drop("spoofed_dhcp")
            return
        subnet = view.subnet
        reply = dhcp.answer(request, view.ip, subnet.mask, subnet.gateway_ip)
        if reply is None:
            return
        udp = Udp(dhcp.DHCP_SERVER_PORT, dhcp.DHCP_CLIENT_PORT, reply).pack(subnet.gateway_ip, _BROADCAST_IP)
        packet = IPv4(subnet.gateway_ip, _BROADCAST_IP, IPPROTO_UDP, udp, ttl=64).pack()
        local.send(Ethernet(view.mac, subnet.gateway_mac, ETHERTYPE_IPV4, packet).pack())
        self.counters["dhcp_replies"] += 1

    def _deliver(self, target: VnicView, frame: bytes, info: FlowInfo | None, flow: EgressFlow | None) -> None:
        hosts = target.ingress_hosts
        seq = self.sequencer.next(target.id) if len(hosts) > 1 else 0
        for host in hosts:
            if host == self.name:
                self._ingress(target, frame, self.name, seq, info, flow)
                continue
            addr = self.topology.hosts.get(host)
            if addr is None or self.overlay is None:
                self._drop("no_overlay_route")
                continue
            self.overlay.sendto(Vxlan(target.vni, frame, seq).pack(), addr)
            self.counters["overlay_tx"] += 1

    # -- data path: to a VM -----------------------------------------------------------------

    def overlay_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        """A VXLAN datagram from another host's vswitch: by its flow's cached decision, or the full path."""
        self.counters["overlay_rx"] += 1
        key = overlay_key(addr, data) if self.overlay_flows.max_entries else None
        if key is not None:
            flow = self.overlay_flows.flows.get(key)
            if flow is not None and self._overlay_cached(flow, data):
                return
            self.overlay_flows.misses += 1
        self._overlay_full(data, addr, key)

    def _overlay_cached(self, flow: OverlayFlow, data: bytes) -> bool:
        proto = flow.proto
        if not intact(data, 22, proto) or (proto == IPPROTO_TCP and data[55] & TCP_STATE_FLAGS):
            return False
        self.overlay_flows.hits += 1
        self._ingress_cached(flow, data[8:], flow.sender, vxlan_seq(data), self.conntrack.clock())
        return True

    def _overlay_full(self, data: bytes, addr: tuple[str, int], key: OverlayKey | None) -> None:
        sender = self.topology.host_by_addr.get(addr)
        if sender is None:
            self._drop("overlay_unknown_sender")
            return
        try:
            vx = Vxlan.parse(data)
            eth = Ethernet.parse(vx.payload)
        except MalformedPacket:
            self.counters["malformed"] += 1
            self._drop("malformed")
            return
        target = self.topology.by_mac.get((vx.vni, eth.dst))
        if target is None or self.name not in target.ingress_hosts:
            self._drop("overlay_no_target")
            return
        flow = None
        if (
            key is not None
            and eth.ethertype == ETHERTYPE_IPV4
            and cacheable_ipv4(data, 22)
            and intact(data, 22, data[31])
        ):
            flow = OverlayFlow(
                target=target, local=self.locals.get(target.id), proto=data[31], ingress=None, sender=sender
            )
            self.overlay_flows.put(key, flow)
        self._ingress(target, vx.payload, sender, vx.seq, None, flow)

    def _ingress(
        self, target: VnicView, frame: bytes, sender: str, seq: int, info: FlowInfo | None, flow: CachedFlow | None
    ) -> None:
        local = self.locals.get(target.id)
        if local is None:
            self._drop("not_attached")
            return
        admission = local.gate.admit(sender, seq, frame)
        if admission is Admission.DELIVER:
            self._filter_ingress(target, local, frame, info, sender, seq, flow)
        elif admission is Admission.HELD:
            local.counters["held_total"] += 1
        else:
            local.counters["duplicates"] += 1
            self._drop("duplicate")

    def _ingress_cached(self, flow: CachedFlow, frame: bytes, sender: str, seq: int, now: float) -> None:
        """:meth:`_ingress` for a frame of a cached flow: the gate as ever, then the cached verdict if it holds."""
        local = flow.local
        if local is None:
            self._drop("not_attached")
            return
        admission = local.gate.admit(sender, seq, frame)
        if admission is Admission.DELIVER:
            verdict = flow.ingress
            if verdict is not None and verdict.renew(now):
                local.send(frame, sender, seq)
                local.counters["tx"] += 1
                self.counters["tx_vm"] += 1
            else:
                self._filter_ingress(flow.target, local, frame, None, sender, seq, flow)
        elif admission is Admission.HELD:
            local.counters["held_total"] += 1
        else:
            local.counters["duplicates"] += 1
            self._drop("duplicate")

    def _filter_ingress(
        self,
        target: VnicView,
        local: LocalVnic,
        frame: bytes,
        info: FlowInfo | None,
        sender: str = "",
        seq: int = 0,
        flow: CachedFlow | None = None,
    ) -> bool:
        """The target's ingress security decision, then delivery; ``flow`` keeps the decision for its next frames."""
        try:
            if info is None:
                info = flow_info(IPv4.parse(frame[14:]))
        except MalformedPacket:
            self.counters["malformed"] += 1
            self._drop("malformed")
            return False
        table = self.conntrack.table(target.id)
        decision, entry = evaluate(table, self.rules(target), info, egress=False)
        if flow is not None:
            flow.ingress = Verdict.of(table, decision, entry, info)
        if not decision.allowed:
            self.counters["denied_ingress"] += 1
            local.counters["denied_ingress"] += 1
            self._drop("denied")
            return False
        local.send(frame, sender, seq)
        local.counters["tx"] += 1
        self.counters["tx_vm"] += 1
        return True
