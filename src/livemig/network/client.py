"""A synchronous, typed client for one vswitch's REST API (tests, benchmark, hostd/LMO wiring later)."""

from __future__ import annotations

from typing import Any

import httpx

from livemig import errors
from livemig.network.envelope import FLOW_VERSION_HEADER, MEDIA_TYPE
from livemig.network.model import (
    Attachment,
    AttachRequest,
    HandoffReport,
    HandoffRequest,
    ImportReport,
    Mapping,
    PauseMarker,
    ResumeReport,
    ResumeRequest,
    SecurityList,
)

_ERRORS: dict[str, type[errors.LivemigError]] = {
    cls.__name__: cls for cls in (errors.InvalidRequest, errors.NotFound, errors.Conflict, errors.BootstrapError)
}
_BY_STATUS: dict[int, type[errors.LivemigError]] = {
    400: errors.InvalidRequest,
    422: errors.InvalidRequest,
    404: errors.NotFound,
    409: errors.Conflict,
}


class VswitchClient:
    def __init__(self, url: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VswitchClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            reply = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise errors.HostUnreachable(f"vswitch at {self.url} did not answer: {exc!r}") from exc
        if reply.status_code >= 400:
            try:
                body = reply.json()
                message = body.get("message", reply.text)
            except ValueError:
                body, message = {}, reply.text
            cls = _ERRORS.get(body.get("error", "")) or _BY_STATUS.get(reply.status_code, errors.LivemigError)
            raise cls(f"vswitch {self.url}: {message}")
        return reply

    def health(self) -> dict[str, str]:
        return dict(self._call("GET", "/healthz").json())

    def counters(self) -> dict[str, Any]:
        return dict(self._call("GET", "/counters").json())

    def metrics(self) -> str:
        return self._call("GET", "/metrics").text

    def put_mapping(self, mapping: Mapping) -> None:
        self._call("PUT", "/mapping", content=mapping.model_dump_json(), headers={"content-type": "application/json"})

    def put_security_list(self, security_list: SecurityList) -> None:
        self._call("PUT", f"/security-lists/{security_list.id}", json=security_list.model_dump())

    def attach(
        self, vnic_id: str, hold: bool = False, qemu_port: int | None = None, tap: str | None = None
    ) -> Attachment:
        body = AttachRequest(vnic_id=vnic_id, hold=hold, qemu_port=qemu_port, tap=tap)
        return Attachment.model_validate(self._call("POST", "/vnics", json=body.model_dump()).json())

    def detach(self, vnic_id: str) -> None:
        self._call("DELETE", f"/vnics/{vnic_id}")

    def export_flows(self, vnic_id: str, since: int = 0) -> tuple[bytes, int]:
        """The flow envelope and the version to pass as ``since`` next time."""
        reply = self._call("GET", f"/vnics/{vnic_id}/flows", params={"since": since})
        return reply.content, int(reply.headers[FLOW_VERSION_HEADER])

    def import_flows(self, vnic_id: str, envelope: bytes) -> ImportReport:
        reply = self._call("POST", f"/vnics/{vnic_id}/flows", content=envelope, headers={"content-type": MEDIA_TYPE})
        return ImportReport.model_validate(reply.json())

    def pause_marker(self, vnic_id: str, flows_since: int | None = None) -> PauseMarker:
        params = {} if flows_since is None else {"flows_since": flows_since}
        return PauseMarker.model_validate(self._call("POST", f"/vnics/{vnic_id}/pause-marker", params=params).json())

    def hand_over(self, vnic_id: str, marker: dict[str, int], flows: str | None = None) -> HandoffReport:
        body = HandoffRequest(marker=marker, flows=flows)
        return HandoffReport.model_validate(
            self._call("POST", f"/vnics/{vnic_id}/handoff", json=body.model_dump()).json()
        )

    def resume(self, vnic_id: str, marker: dict[str, int] | None = None, replay_recent: bool = False) -> ResumeReport:
        body = ResumeRequest(marker=marker or {}, replay_recent=replay_recent)
        return ResumeReport.model_validate(
            self._call("POST", f"/vnics/{vnic_id}/resume", json=body.model_dump()).json()
        )
