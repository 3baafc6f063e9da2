"""The vswitch boundary (LMO → vswitch, hostd → vswitch): its models, its routes, two clients.

The LMO pushes the mapping and security lists to every vswitch and moves a VNIC's flow state
between two of them; hostd attaches its VMs' NICs and, inside a migration's pause, asks the source
for the pause marker and hands the VNIC over to the destination. The routes below are the whole
contract; ``network/api.py`` serves exactly these. Flow state travels as an opaque, versioned,
checksummed envelope (``network/envelope.py``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from livemig.network.envelope import FLOW_VERSION_HEADER, MEDIA_TYPE
from livemig.network.model import Mapping, SecurityList
from livemig.wire.base import AsyncHttp, AsyncService, Call, Credentials, HttpReply, SyncService, call


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------- models


class AttachRequest(_Strict):
    """Attach a local port for a VNIC (a UDP pair for QEMU, or a tap device as root).

    ``hold``: start with ingress held (a migration destination whose VM is not running yet).
    """

    vnic_id: str
    hold: bool = False
    qemu_port: int | None = Field(default=None, ge=1, le=65535, description="default: a free port")
    tap: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,15}$", description="tap name (root)")


class Attachment(_Strict):
    """Where a VNIC's frames enter and leave this vswitch."""

    vnic_id: str
    kind: Literal["udp", "tap"]
    switch_port: int | None = None
    qemu_port: int | None = None
    tap: str | None = None
    holding: bool = False

    def netdev(self, netdev_id: str = "n0") -> str:
        """The ``-netdev`` argument QEMU needs to plug into this port."""
        return (
            f"dgram,id={netdev_id},local.type=inet,local.host=127.0.0.1,local.port={self.qemu_port},"
            f"remote.type=inet,remote.host=127.0.0.1,remote.port={self.switch_port}"
        )


class Delivery(NamedTuple):
    """One frame the vswitch wrote to a VM's QEMU socket: who stamped it (``seq`` 0: nobody) and when.

    A named tuple, so a pause marker's 256 of them travel as compact JSON arrays: the marker is
    fetched inside the guest's pause, where every millisecond of (de)serialization counts."""

    sender: str
    seq: int
    at: float  # wall clock, comparable with QEMU's event timestamps on the same host


class PauseMarker(_Strict):
    """Per sending host, the last sequence number this vswitch processed for the VNIC before holding,
    and the last frames written to QEMU's socket (oldest first). Asked with ``flows_since``, also
    the VNIC's final flow delta (its envelope, base64), so the pause needs one call here, not two."""

    vnic_id: str
    marker: dict[str, int]
    recent: list[Delivery] = Field(default_factory=list)
    flows: str | None = Field(default=None, description="base64 flow envelope: changes after flows_since")
    flows_version: int | None = None


class HandoffRequest(_Strict):
    """The destination's half of the pause, in one call: import the final flows, then release the
    held ingress above ``marker``."""

    marker: dict[str, int] = Field(default_factory=dict)
    flows: str | None = Field(default=None, max_length=64 * 1024 * 1024, description="base64 flow envelope")


class ResumeRequest(_Strict):
    """Release held ingress: frames whose sequence is above ``marker`` (the source's) are delivered."""

    marker: dict[str, int] = Field(default_factory=dict)
    replay_recent: bool = Field(default=False, description="first re-send the frames this vswitch wrote to "
                                "QEMU above the marker (the source, after a failed hand-off)")  # fmt: skip


class ResumeReport(_Strict):
    vnic_id: str
    replayed: int = 0
    delivered: int
    duplicates_skipped: int
    denied: int
    lost_to_overflow: int


class CounterSnapshot(_Strict):
    """What ``GET /counters`` returns: switch-wide events (``dropped_<reason>``, ``malformed``,
    ``denied_ingress``/``denied_egress``, ``arp_replies``, ``routed``, ``overlay_tx``/``rx`` ...)
    and, per attached VNIC, its events plus ``held``/``held_bytes``/``overflowed``/``flows``."""

    host: str
    switch: dict[str, int]
    vnics: dict[str, dict[str, int]]


class ImportReport(_Strict):
    vnic_id: str
    imported: int
    removed: int
    version: int


class HandoffReport(_Strict):
    vnic_id: str
    flows: ImportReport | None
    resume: ResumeReport


class Health(BaseModel):
    status: str
    host: str
    overlay: str


class MappingAccepted(BaseModel):
    generation: int


class FlowExport(NamedTuple):
    """A VNIC's flows as the source exported them: the envelope, and the version to pass as
    ``since`` next time (the envelope is opaque to everyone but the vswitches)."""

    envelope: bytes
    version: int


# ---------------------------------------------------------------------- routes


def health() -> Call[Health]:
    return call("GET", "/healthz", Health)


def counters() -> Call[CounterSnapshot]:
    return call("GET", "/counters", CounterSnapshot)


def metrics() -> Call[str]:
    return Call("GET", "/metrics", _text)


def put_mapping(mapping: Mapping) -> Call[MappingAccepted]:
    return call("PUT", "/mapping", MappingAccepted, json=mapping)


def mapping() -> Call[Mapping]:
    return call("GET", "/mapping", Mapping)


def put_security_list(security_list: SecurityList) -> Call[SecurityList]:
    return call("PUT", f"/security-lists/{security_list.id}", SecurityList, json=security_list)


def delete_security_list(list_id: str) -> Call[None]:
    return call("DELETE", f"/security-lists/{list_id}")


def attach(vnic_id: str, hold: bool = False, qemu_port: int | None = None, tap: str | None = None) -> Call[Attachment]:
    return call(
        "POST", "/vnics", Attachment, json=AttachRequest(vnic_id=vnic_id, hold=hold, qemu_port=qemu_port, tap=tap)
    )


def attachments() -> Call[list[Attachment]]:
    return call("GET", "/vnics", list[Attachment])


def detach(vnic_id: str) -> Call[None]:
    """Idempotent: 204 whether or not the VNIC was attached here."""
    return call("DELETE", f"/vnics/{vnic_id}")


def export_flows(vnic_id: str, since: int = 0) -> Call[FlowExport]:
    def parse(reply: HttpReply) -> FlowExport:
        return FlowExport(reply.content, int(reply.headers.get(FLOW_VERSION_HEADER, since)))

    return Call("GET", f"/vnics/{vnic_id}/flows", parse, params={"since": since})


def import_flows(vnic_id: str, envelope: bytes) -> Call[ImportReport]:
    return call("POST", f"/vnics/{vnic_id}/flows", ImportReport, content=envelope, headers={"content-type": MEDIA_TYPE})


def pause_marker(vnic_id: str, flows_since: int | None = None) -> Call[PauseMarker]:
    params = None if flows_since is None else {"flows_since": flows_since}
    return call("POST", f"/vnics/{vnic_id}/pause-marker", PauseMarker, params=params)


def hand_over(vnic_id: str, marker: dict[str, int], flows: str | None = None) -> Call[HandoffReport]:
    return call("POST", f"/vnics/{vnic_id}/handoff", HandoffReport, json=HandoffRequest(marker=marker, flows=flows))


def resume(vnic_id: str, marker: dict[str, int] | None = None, replay_recent: bool = False) -> Call[ResumeReport]:
    body = ResumeRequest(marker=marker or {}, replay_recent=replay_recent)
    return call("POST", f"/vnics/{vnic_id}/resume", ResumeReport, json=body)


def _text(reply: HttpReply) -> str:
    return reply.text


# ---------------------------------------------------------------------- clients


class VswitchClient(SyncService):
    """A vswitch from plain code (tests, benchmarks): one method per route above."""

    def __init__(self, url: str, timeout: float = 10.0, credentials: Credentials | None = None) -> None:
        super().__init__(f"vswitch {url}", url, timeout, credentials)

    def health(self) -> Health:
        return self.run(health())

    def counters(self) -> CounterSnapshot:
        return self.run(counters())

    def metrics(self) -> str:
        return self.run(metrics())

    def put_mapping(self, value: Mapping) -> MappingAccepted:
        return self.run(put_mapping(value))

    def put_security_list(self, security_list: SecurityList) -> SecurityList:
        return self.run(put_security_list(security_list))

    def attach(
        self, vnic_id: str, hold: bool = False, qemu_port: int | None = None, tap: str | None = None
    ) -> Attachment:
        return self.run(attach(vnic_id, hold, qemu_port, tap))

    def detach(self, vnic_id: str) -> None:
        self.run(detach(vnic_id))

    def export_flows(self, vnic_id: str, since: int = 0) -> FlowExport:
        return self.run(export_flows(vnic_id, since))

    def import_flows(self, vnic_id: str, envelope: bytes) -> ImportReport:
        return self.run(import_flows(vnic_id, envelope))

    def pause_marker(self, vnic_id: str, flows_since: int | None = None) -> PauseMarker:
        return self.run(pause_marker(vnic_id, flows_since))

    def hand_over(self, vnic_id: str, marker: dict[str, int], flows: str | None = None) -> HandoffReport:
        return self.run(hand_over(vnic_id, marker, flows))

    def resume(self, vnic_id: str, marker: dict[str, int] | None = None, replay_recent: bool = False) -> ResumeReport:
        return self.run(resume(vnic_id, marker, replay_recent))


class AsyncVswitchClient(AsyncService):
    """A vswitch from an event loop (the LMO's mapping service, hostd's ports and hand-off)."""

    kind = "vswitch"

    def __init__(self, url: str, http: AsyncHttp, who: str | None = None) -> None:
        super().__init__(who or f"vswitch {url}", url, http)
