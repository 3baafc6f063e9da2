"""The vswitch's REST API (FastAPI) and its process entry point.

Routes (all JSON unless said otherwise; errors are livemig's ``{"error", "message"}`` bodies):

    GET    /healthz                       {"status", "host", "overlay"}
    GET    /metrics                       Prometheus text
    GET    /counters                      per-switch and per-VNIC counters
    PUT    /mapping                       Mapping (whole topology; generation must not go back)
    GET    /mapping
    PUT    /security-lists/{id}           SecurityList
    GET    /security-lists
    DELETE /security-lists/{id}
    POST   /vnics                         AttachRequest -> Attachment (ports for QEMU's -netdev dgram)
    GET    /vnics                         [Attachment]
    GET    /vnics/{id}                    Attachment
    DELETE /vnics/{id}                    detach; drop flows, held frames, this host from its ingress
                                          (idempotent: 204 whether or not it was attached)
    GET    /vnics/{id}/flows?since=V      flow envelope (bytes); header X-Livemig-Flow-Version
    POST   /vnics/{id}/flows              body: flow envelope -> ImportReport
    POST   /vnics/{id}/pause-marker?flows_since=V
                                          -> PauseMarker (and the VNIC's ingress is held from now on);
                                          with flows_since, also the final flow delta (base64 envelope)
    POST   /vnics/{id}/resume             ResumeRequest -> ResumeReport (held frames above the marker)
    POST   /vnics/{id}/handoff            HandoffRequest -> HandoffReport (import flows, then resume:
                                          the destination's half of the pause in one call)

Who may call each: :data:`POLICY`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from livemig.errors import InvalidRequest
from livemig.faults.api import FAULT_CHANGES, FAULT_READS, mount_faults
from livemig.faults.registry import REGISTRY
from livemig.network.envelope import FLOW_VERSION_HEADER, MEDIA_TYPE
from livemig.network.model import Mapping, SecurityList
from livemig.network.persist import SwitchStateFile
from livemig.network.vswitch import Vswitch
from livemig.security.access import ANY_SERVICE, NO_DOCS, Access, Guard, Policy, lmo_only, services
from livemig.security.pki import LeafFiles, Role
from livemig.security.tls import INSECURE_STATE, ReloadingServerContext, uvicorn_tls
from livemig.wire.base import SERVER_KEEPALIVE_S
from livemig.wire.server import install_error_handlers
from livemig.wire.vswitch import (
    Attachment,
    AttachRequest,
    CounterSnapshot,
    HandoffReport,
    HandoffRequest,
    ImportReport,
    PauseMarker,
    ResumeReport,
    ResumeRequest,
)

log = logging.getLogger(__name__)
_GAUGES = {"held", "held_bytes", "flows"}
_DROPPED = "dropped_"  # the switch's counters of drops by reason: dropped_<reason>
_CACHE = "flowcache_"  # the flow caches' stats: flowcache_<cache>_<event>


class VswitchCollector(Collector):
    """Exposes the vswitch's counters at scrape time (no per-frame Prometheus calls on the data path).

    ``livemig_vswitch_frames_total{event}``: what happened to frames (received from VMs, sent to
    them, routed, over the overlay, ARP and DHCP answered, denied); ``livemig_vswitch_dropped_frames_total{reason}``:
    every drop by its reason; ``livemig_vswitch_conntrack_entries{vnic}``: tracked flows;
    ``livemig_vswitch_flow_cache_*``: the fast path's cache. Per VNIC: ``livemig_vswitch_vnic_frames_total``
    and ``livemig_vswitch_vnic_state`` (held frames and bytes during a hand-off, flows)."""

    def __init__(self, vswitch: Vswitch) -> None:
        self.vswitch = vswitch

    def collect(self) -> Iterator[Metric]:
        snap = self.vswitch.snapshot_counters()
        host = self.vswitch.name
        switch = CounterMetricFamily("livemig_vswitch_frames", "vswitch frame events by kind", labels=["host", "event"])
        dropped = CounterMetricFamily("livemig_vswitch_dropped_frames", "frames the vswitch dropped, by reason",
                                      labels=["host", "reason"])  # fmt: skip
        cache_events = CounterMetricFamily("livemig_vswitch_flow_cache_events", "flow cache hits, misses, evictions "
                                           "and flushes", labels=["host", "cache", "event"])  # fmt: skip
        cache_entries = GaugeMetricFamily("livemig_vswitch_flow_cache_entries", "flows in the flow cache",
                                          labels=["host", "cache"])  # fmt: skip
        for event, value in sorted(snap.switch.items()):
            if event.startswith(_DROPPED):
                dropped.add_metric([host, event.removeprefix(_DROPPED)], value)
            elif event.startswith(_CACHE):
                cache, _, what = event.removeprefix(_CACHE).rpartition("_")
                if what == "entries":
                    cache_entries.add_metric([host, cache], value)
                else:
                    cache_events.add_metric([host, cache, what], value)
            elif event != "dropped":  # the sum of the reasons
                switch.add_metric([host, event], value)
        conntrack = GaugeMetricFamily("livemig_vswitch_conntrack_entries", "flows tracked per VNIC",
                                      labels=["host", "vnic"])  # fmt: skip
        vnic_events = CounterMetricFamily(
            "livemig_vswitch_vnic_frames", "per-VNIC frame events", labels=["host", "vnic", "event"]
        )
        vnic_gauges = GaugeMetricFamily(
            "livemig_vswitch_vnic_state", "per-VNIC held frames/bytes and flows", labels=["host", "vnic", "what"]
        )
        for vnic, counters in sorted(snap.vnics.items()):
            conntrack.add_metric([host, vnic], counters.get("flows", 0))
            for event, value in sorted(counters.items()):
                (vnic_gauges if event in _GAUGES else vnic_events).add_metric([host, vnic, event], value)
        yield from (switch, dropped, conntrack, cache_events, cache_entries, vnic_events, vnic_gauges)


async def _point(name: str, vswitch: Vswitch) -> None:
    """``vswitch.<route>``: before the route acts (the VM comes from the caller's migration header)."""
    if REGISTRY.armed:
        await REGISTRY.fire(name, host=vswitch.name)


_HEALTH = Access(ANY_SERVICE)
_READ = services(Role.LMO, Role.HOSTD)  # the topology and counters: the LMO and the hosts, not QEMU
_LMO = services(Role.LMO)
#: the LMO, and this host's own hostd (attaching its VMs' NICs, holding and releasing at the pause)
_OWN_HOSTD = services(Role.LMO, Role.HOSTD, own_host=True)
#: who may call each route: the LMO programs the mapping and security lists and moves flow state;
#: hostd plugs its own host's NICs and runs the pause; the hand-off comes from the *source* host's
#: hostd, so any hostd of the region may hand a VNIC over to this vswitch
POLICY: Policy = {
    ("GET", "/healthz"): _HEALTH, ("GET", "/metrics"): _HEALTH, ("GET", "/counters"): _READ,
    ("GET", "/mapping"): _READ, ("GET", "/security-lists"): _READ, ("GET", "/vnics"): _READ,
    ("GET", "/vnics/{vnic_id}"): _READ,
    ("PUT", "/mapping"): _LMO, ("PUT", "/security-lists/{list_id}"): _LMO,
    ("DELETE", "/security-lists/{list_id}"): _LMO,
    ("GET", "/vnics/{vnic_id}/flows"): _LMO, ("POST", "/vnics/{vnic_id}/flows"): _LMO,
    ("POST", "/vnics"): _OWN_HOSTD, ("DELETE", "/vnics/{vnic_id}"): _OWN_HOSTD,
    ("POST", "/vnics/{vnic_id}/pause-marker"): _OWN_HOSTD, ("POST", "/vnics/{vnic_id}/resume"): _OWN_HOSTD,
    ("POST", "/vnics/{vnic_id}/handoff"): services(Role.LMO, Role.HOSTD),
    **{route: _LMO for route in (*FAULT_READS, *FAULT_CHANGES)},  # the LMO collects firings; chaos arms faults
}  # fmt: skip


def create_app(vswitch: Vswitch, state_path: Path | None = None, *, insecure: bool = False) -> FastAPI:
    """The vswitch's app; with ``state_path`` its control-plane state survives a restart
    (``persist.py``); ``insecure`` (a lab's ``--insecure``): plain HTTP for anyone."""
    state = SwitchStateFile(state_path) if state_path is not None else None

    def changed() -> None:
        if state is not None:
            state.save(vswitch)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await vswitch.start()
        if state is not None:
            state.restore(vswitch)
        yield
        await vswitch.stop()

    app = FastAPI(title=f"livemig vswitch {vswitch.name}", lifespan=lifespan,
                  dependencies=[Depends(Guard(POLICY, host=vswitch.name, default=lmo_only))], **NO_DOCS)  # fmt: skip
    setattr(app.state, INSECURE_STATE, insecure)
    install_error_handlers(app)
    mount_faults(app)
    registry = CollectorRegistry()
    registry.register(VswitchCollector(vswitch))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "host": vswitch.name, "overlay": vswitch.overlay_endpoint}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/counters")
    async def counters() -> CounterSnapshot:
        return vswitch.snapshot_counters()

    @app.put("/mapping")
    async def put_mapping(mapping: Mapping) -> dict[str, int]:
        await _point("vswitch.mapping", vswitch)
        vswitch.set_mapping(mapping)
        changed()
        return {"generation": mapping.generation}

    @app.get("/mapping")
    async def get_mapping() -> Mapping:
        return vswitch.topology.mapping

    @app.put("/security-lists/{list_id}")
    async def put_security_list(list_id: str, body: SecurityList) -> SecurityList:
        if body.id != list_id:
            raise InvalidRequest(f"path names security list {list_id!r} but the body names {body.id!r}")
        vswitch.set_security_list(body)
        changed()
        return body

    @app.get("/security-lists")
    async def list_security_lists() -> list[SecurityList]:
        return [vswitch.security_lists[k] for k in sorted(vswitch.security_lists)]

    @app.delete("/security-lists/{list_id}", status_code=204)
    async def delete_security_list(list_id: str) -> Response:
        vswitch.delete_security_list(list_id)
        changed()
        return Response(status_code=204)

    @app.post("/vnics", status_code=201)
    async def attach(body: AttachRequest) -> Attachment:
        await _point("vswitch.attach", vswitch)
        attachment = await vswitch.attach(body)
        changed()
        return attachment

    @app.get("/vnics")
    async def list_vnics() -> list[Attachment]:
        return [vswitch.attachment(v) for v in sorted(vswitch.locals)]

    @app.get("/vnics/{vnic_id}")
    async def get_vnic(vnic_id: str) -> Attachment:
        return vswitch.attachment(vnic_id)

    @app.delete("/vnics/{vnic_id}", status_code=204)
    async def detach(vnic_id: str) -> Response:
        await _point("vswitch.detach", vswitch)
        if vswitch.detach(vnic_id):
            changed()
        return Response(status_code=204)

    @app.get("/vnics/{vnic_id}/flows")
    async def export_flows(vnic_id: str, since: int = 0) -> Response:
        await _point("vswitch.flows.export", vswitch)
        batch, envelope = vswitch.export_flows(vnic_id, max(0, since))
        return Response(envelope, media_type=MEDIA_TYPE, headers={FLOW_VERSION_HEADER: str(batch.version)})

    @app.post("/vnics/{vnic_id}/flows")
    async def import_flows(vnic_id: str, request: Request) -> ImportReport:
        await _point("vswitch.flows.import", vswitch)
        return vswitch.import_flows(vnic_id, await request.body())

    @app.post("/vnics/{vnic_id}/pause-marker")
    async def pause_marker(vnic_id: str, flows_since: int | None = None) -> PauseMarker:
        await _point("vswitch.pause_marker", vswitch)
        marker = vswitch.pause_marker(vnic_id, flows_since)
        _after_pause(changed)
        return marker

    @app.post("/vnics/{vnic_id}/handoff")
    async def hand_over(vnic_id: str, body: HandoffRequest) -> HandoffReport:
        await _point("vswitch.handoff", vswitch)
        report = vswitch.hand_over(vnic_id, body)
        _after_pause(changed)
        return report

    @app.post("/vnics/{vnic_id}/resume")
    async def resume(vnic_id: str, body: ResumeRequest | None = None) -> ResumeReport:
        request = body or ResumeRequest()
        await _point("vswitch.resume", vswitch)
        report = vswitch.resume(vnic_id, request.marker, request.replay_recent)
        _after_pause(changed)
        return report

    return app


def _after_pause(save: Callable[[], None]) -> None:
    """Save a VNIC's holding state once the answer is out: these calls run inside a guest's pause,
    where an fsync does not belong."""
    asyncio.get_running_loop().call_later(0.2, save)


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:7070"`` -> ("127.0.0.1", 7070)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidRequest(f"listen address {listen!r} is not host:port")
    return host, int(port)


def run_vswitch(
    host_name: str,
    api_listen: str,
    overlay_listen: str,
    log_level: str = "info",
    *,
    state_dir: Path | None = None,
    tls: LeafFiles | None = None,
) -> None:
    """Run one host's vswitch (REST API + dataplane) until SIGINT/SIGTERM; with ``state_dir``, its
    mapping, security lists and VNIC ports are restored when it restarts; ``tls``: its leaf
    (mutual TLS, roles checked), None: plain HTTP for anyone (``--insecure``)."""
    host, port = split_listen(api_listen)
    split_listen(overlay_listen)
    vswitch = Vswitch(host_name, overlay_listen)
    state = state_dir / "vswitch.json" if state_dir is not None else None
    extra = uvicorn_tls(ReloadingServerContext(tls)) if tls is not None else {}
    uvicorn.run(create_app(vswitch, state, insecure=tls is None), host=host, port=port, log_level=log_level,
                log_config=None, access_log=False, timeout_keep_alive=SERVER_KEEPALIVE_S, **extra)  # fmt: skip
