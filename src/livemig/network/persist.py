"""A vswitch's control-plane state on disk, so a restarted vswitch forwards for the VMs it served.

Why: the VMs' QEMUs outlive the vswitch (they are not its children), and each one's NIC socket
stays connected to the vswitch's UDP port. A vswitch that crashed and came back empty would leave
every VM of its host without a network until someone re-plugged it; the LMO's next mapping push
would not help, since the ports themselves are gone. So every change of the mapping, the security
lists or the attached VNICs is saved (``StateFile``: fsync'd, atomically replaced), and at start
the vswitch restores them and binds each VNIC's *same* UDP port again, which QEMU's socket is
still connected to. What is not restored: conntrack entries (a security list that allows only
replies then drops them until the guest's side opens the flow again) and frames held at the time
of the crash; a tap VNIC (its device went with the process that held it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from livemig.errors import LivemigError, StateError
from livemig.network.model import Mapping, SecurityList
from livemig.network.ports import reopen_udp_port
from livemig.network.vswitch import Vswitch
from livemig.statefile import StateFile
from livemig.wire.vswitch import Attachment

log = logging.getLogger(__name__)
STATE_VERSION = 1


class SwitchState(BaseModel):
    mapping: Mapping
    security_lists: list[SecurityList] = Field(default_factory=list)
    attachments: list[Attachment] = Field(default_factory=list)


class SwitchStateFile:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = StateFile(path, STATE_VERSION)

    def save(self, vswitch: Vswitch) -> None:
        state = SwitchState(
            mapping=vswitch.topology.mapping,
            security_lists=[vswitch.security_lists[k] for k in sorted(vswitch.security_lists)],
            attachments=[vswitch.attachment(v) for v in sorted(vswitch.locals)],
        )
        try:
            self.file.save(state.model_dump(mode="json"))
        except OSError as exc:  # a full disk costs the restart its memory, not the switch its traffic
            log.error("vswitch %s: state not saved to %s: %s", vswitch.name, self.file.path, exc)

    def restore(self, vswitch: Vswitch) -> int:
        """Bring back what the last run saved; returns how many VNIC ports were re-bound."""
        try:
            saved = self.file.load()
        except StateError as exc:
            log.error("vswitch %s: not restoring: %s", vswitch.name, exc.message)
            return 0
        if saved is None:
            return 0
        saved.pop("version", None)
        try:
            state = SwitchState.model_validate(saved)
        except ValidationError as exc:
            log.error("vswitch %s: not restoring %s: %s", vswitch.name, self.file.path, exc.errors()[0].get("msg"))
            return 0
        for security_list in state.security_lists:
            vswitch.set_security_list(security_list)
        vswitch.set_mapping(state.mapping)
        rebound = 0
        for attachment in state.attachments:
            if attachment.kind != "udp" or attachment.switch_port is None or attachment.qemu_port is None:
                log.warning("vswitch %s: VNIC %s (%s) is not restored", vswitch.name, attachment.vnic_id,
                            attachment.kind)  # fmt: skip
                continue
            try:
                port = reopen_udp_port(attachment.vnic_id, vswitch.vm_frame, attachment.switch_port,
                                       attachment.qemu_port)  # fmt: skip
            except LivemigError as exc:
                log.error("vswitch %s: VNIC %s not restored: %s", vswitch.name, attachment.vnic_id, exc.message)
                continue
            vswitch.plug(port, attachment)
            rebound += 1
        log.info("vswitch %s: restored mapping generation %d, %d security list(s), %d VNIC port(s)", vswitch.name,
                 state.mapping.generation, len(state.security_lists), rebound)  # fmt: skip
        return rebound
