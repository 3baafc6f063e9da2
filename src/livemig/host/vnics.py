"""hostd's side of the VCN dataplane: plugging NICs into this host's vswitch, and the network
part of the switchover hook.

At the pause (QEMU's pre-switchover), for each VNIC, two local HTTP calls: the source vswitch's
pause marker (it holds the VNIC's ingress from now on), which also carries the flows changed
since the bulk copy; then the destination vswitch's hand-off, which imports those flows and
releases its held ingress above the marker. The destination QEMU is not running yet, but
everything released now arrived after the source paused, so the kernel socket hands the resumed
guest exactly the frames it has not seen. The pause includes these calls, so nothing else may
happen here.

hostd creates each NIC's datagram socket itself and passes it to QEMU (``-netdev
dgram,local.type=fd``), keeping a duplicate. At the pause it drains, through that duplicate,
the frames the stopped QEMU never read, and lowers the marker below them
(``network.handoff.replay_marker``): the destination delivers them instead of nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from pathlib import Path

from livemig.errors import InvalidRequest, LivemigError
from livemig.faults.points import fault_point
from livemig.model.vm import NicDevice, VmSpec
from livemig.network.handoff import PAUSE_PROBE, Drain, Replay, replay_marker
from livemig.security.client import handshakes_started
from livemig.wire import vswitch
from livemig.wire.base import AsyncHttp, async_http
from livemig.wire.hostd import VnicHandoff
from livemig.wire.vswitch import AsyncVswitchClient

log = logging.getLogger(__name__)


def vswitch_nics(spec: VmSpec) -> list[NicDevice]:
    return [d for d in spec.devices if isinstance(d, NicDevice) and d.backend == "vswitch"]


class VswitchPorts:
    """Attach and detach this host's vswitch ports for a VM's NICs (async, hostd's event loop)."""

    def __init__(self, url: str | None) -> None:
        self.url = url.rstrip("/") if url else None
        self._switches: dict[str, AsyncVswitchClient] = {}
        # made on first use: a client costs most of a megabyte (its TLS context), and a host whose
        # VMs have no VNICs never needs one (the fleet simulator runs thousands of agents)
        self._http: AsyncHttp | None = None
        self._sockets: dict[str, socket.socket] = {}  # VNIC id -> our duplicate of QEMU's NIC socket

    def switch(self, url: str | None = None) -> AsyncVswitchClient:
        """This host's vswitch (or another's, by URL). All share one keep-alive connection pool: a
        fresh connection costs milliseconds, and the hand-off runs inside the guest's pause."""
        url = (url or self.url or "").rstrip("/")
        if not url:
            raise InvalidRequest("this hostd runs without a vswitch (--vswitch URL)")
        if url not in self._switches:
            if self._http is None:
                self._http = async_http(timeout=10)
            self._switches[url] = AsyncVswitchClient(url, self._http)
        return self._switches[url]

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def warm_up(self, handoffs: list[VnicHandoff]) -> None:
        """Open the connections the hand-off will use, before the pause rather than inside it."""
        for url in {self.url, *(h.destination_vswitch for h in handoffs)}:
            if url:
                with contextlib.suppress(LivemigError):
                    await self.switch(url).run(vswitch.health())

    async def attach(self, spec: VmSpec, *, hold: bool) -> dict[str, str]:
        """``-netdev`` arguments per NIC id; ``hold`` for a migration destination (not yet running)."""
        nics = vswitch_nics(spec)
        if not nics:
            return {}
        if self.url is None:
            raise InvalidRequest(f"VM {spec.name} has vswitch NICs but this hostd has no --vswitch")
        netdevs: dict[str, str] = {}
        for nic in nics:
            assert nic.vnic is not None  # the spec's validator: a vswitch NIC names its VNIC
            with contextlib.suppress(LivemigError):  # a leftover port from an earlier attempt
                await self.switch().run(vswitch.detach(nic.vnic))
            port = await self.switch().run(vswitch.attach(nic.vnic, hold=hold))
            if port.qemu_port is None or port.switch_port is None:
                raise LivemigError(f"vswitch attached VNIC {nic.vnic} without a UDP port pair: {port}")
            sock = self._open_socket(nic.vnic, port.qemu_port, port.switch_port)
            netdevs[nic.id] = f"dgram,id=net_{nic.id},local.type=fd,local.str={sock.fileno()}"
        return netdevs

    def _open_socket(self, vnic: str | None, qemu_port: int, switch_port: int) -> socket.socket:
        """QEMU's side of the VNIC: bound where the vswitch sends, connected to the vswitch's port."""
        self._close_socket(vnic)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            _grow_receive_buffer(sock)
            sock.bind(("127.0.0.1", qemu_port))
            sock.connect(("127.0.0.1", switch_port))
        except OSError as exc:
            sock.close()
            raise LivemigError(f"VNIC {vnic}: cannot open QEMU's socket on 127.0.0.1:{qemu_port}: {exc}") from exc
        sock.setblocking(False)
        self._sockets[str(vnic)] = sock
        return sock

    def _log_hand_off(self, vnic: str, replay: Replay, timings: str) -> None:
        drops = self._socket_drops(vnic)
        log.info("VNIC %s: %d frame(s) never reached the paused guest; the destination delivers them%s%s (%s)",
                 vnic, replay.unconsumed,
                 f" ({replay.unrecoverable} unstamped, lost)" if replay.unrecoverable else "",
                 f"; the kernel dropped {drops} for a full socket buffer" if drops else "", timings)  # fmt: skip

    def _socket_drops(self, vnic: str) -> int | None:
        """How many datagrams the kernel dropped for QEMU's socket (full receive buffer): a frame
        lost before the guest could read it, which no marker can bring back."""
        sock = self._sockets.get(vnic)
        if sock is None:
            return None
        return udp_socket_drops(os.fstat(sock.fileno()).st_ino)

    def _close_socket(self, vnic: str | None) -> None:
        sock = self._sockets.pop(str(vnic), None)
        if sock is not None:
            sock.close()

    def pass_fds(self, spec: VmSpec) -> list[int]:
        """The NIC sockets QEMU must inherit (after ``attach``)."""
        return [self._sockets[nic.vnic].fileno() for nic in vswitch_nics(spec) if nic.vnic in self._sockets]

    def _drain(self, vnic: str) -> Drain | None:
        """Read out every frame QEMU left unread: (how many, not counting the vswitch's pause probe;
        whether the probe was among them). None if we hold no duplicate (re-adopted VM)."""
        sock = self._sockets.get(vnic)
        if sock is None:
            return None
        drained, probe_left = 0, False
        while True:
            try:
                frame = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return Drain(drained, probe_left)
            except OSError:
                return Drain(drained, probe_left)  # e.g. ECONNREFUSED from an earlier send: nothing to read
            if frame == PAUSE_PROBE:
                probe_left = True
            else:
                drained += 1

    async def detach(self, spec: VmSpec) -> None:
        for nic in vswitch_nics(spec):
            self._close_socket(nic.vnic)
        if self.url is None:
            return
        for nic in vswitch_nics(spec):
            with contextlib.suppress(LivemigError):
                await self.switch().run(vswitch.detach(str(nic.vnic)))

    async def hand_off(self, handoffs: list[VnicHandoff], stopped_at: float | None = None,
                       markers: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, int]]:  # fmt: skip
        """Inside the pause: marker, final flows, release on the destination. Returns the markers.

        ``stopped_at``: wall-clock time of QEMU's STOP event, to tell which frames came too late.
        ``markers`` is filled as each VNIC's marker is taken, so a hand-off that fails part-way
        (the destination's vswitch did not answer) can still be undone for what it did.
        """
        assert self.url is not None
        markers = {} if markers is None else markers
        handshakes = handshakes_started()
        for h in handoffs:
            # two calls per VNIC inside the pause: the source's marker with the final flow delta,
            # then the destination's import-and-release ("hold" at hostd.flow_sync: the test switch
            # that sends no final flows)
            started = time.perf_counter()
            send_flows = not await fault_point("hostd.flow_sync")
            reply = await self.switch().run(vswitch.pause_marker(h.vnic, h.flows_since if send_flows else None))
            marked = time.perf_counter()
            # the vswitch writes nothing more to QEMU now: what is left in its socket, it never read
            replay = replay_marker(reply.marker, reply.recent, self._drain(h.vnic), stopped_at)
            markers[h.vnic] = replay.marker  # what the guest has seen: the same cut for either side
            drained = time.perf_counter()
            await self.switch(h.destination_vswitch).run(vswitch.hand_over(h.vnic, replay.marker, reply.flows))
            done = time.perf_counter()
            timings = (f"marker {1000 * (marked - started):.1f} ms, drain {1000 * (drained - marked):.1f} ms, "
                       f"hand-off {1000 * (done - drained):.1f} ms")  # fmt: skip
            if (opened := handshakes_started() - handshakes) > 0:
                # the connections warm_up opened were gone: the guest's pause paid for a handshake
                timings += f"; {opened} new TLS connection(s) inside the pause"
            # after the pause: reading /proc/net/udp is not the guest's time to spend
            asyncio.get_running_loop().call_later(0.05, self._log_hand_off, h.vnic, replay, timings)
        return markers

    async def release_here(self, markers: dict[str, dict[str, int]]) -> None:
        """The migration failed after the hand-off: the source runs again, give it its ingress back.

        ``markers`` are the lowered ones: the source vswitch first re-sends the frames its paused
        QEMU never passed to the guest (hostd drained them, or QEMU dropped its parked one at the
        stop), then releases what it held."""
        if self.url is None:
            return
        for vnic, marker in markers.items():
            with contextlib.suppress(LivemigError):
                await self.switch().run(vswitch.resume(vnic, marker, replay_recent=True))


#: QEMU's NIC socket's receive buffer: under TCG a pre-copy dirty sync can hold the vCPU for
#: 100-200 ms, and the default (rmem_default, about 200 KiB: a few hundred small datagrams)
#: then overflows at 1,000+ packets/s
NIC_SOCKET_BUFFER = 4 * 1024 * 1024


def _grow_receive_buffer(sock: socket.socket) -> None:
    """As root, past ``net.core.rmem_max`` (SO_RCVBUFFORCE); otherwise up to it."""
    for option in (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, NIC_SOCKET_BUFFER)
            return
        except OSError:
            continue


def udp_socket_drops(inode: int, table: str = "/proc/net/udp") -> int | None:
    """The ``drops`` column of the UDP socket with this inode (None if it is not listed)."""
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 13 and fields[9] == str(inode):
            return int(fields[12])
    return None
