"""Attaching a VM's volumes on a host, and letting go of them: one place for the VM-create,
VM-delete and migration paths. Every call is idempotent (the store remembers attachments), so a
restarted LMO repeating a step never attaches twice."""

from __future__ import annotations

import contextlib

from livemig import errors
from livemig.control.store import Store
from livemig.errors import Conflict, InvalidRequest
from livemig.model.vm import CIDATA_BYTES, NVRAM_BYTES, NbdExport, VmSpec
from livemig.wire import blockd
from livemig.wire.blockd import BlockdClient
from livemig.wire.lmo import Transfer


def name_own_volumes(spec: VmSpec) -> VmSpec:
    """``spec`` with its own volumes named: a UEFI VM's variable store (``<vm>.nvram``) and its
    cloud-init seed (``<vm>.cidata``), unless the spec names them already."""
    update: dict[str, object] = {}
    if spec.firmware is not None and spec.firmware.kind == "uefi" and not spec.firmware.nvram_volume:
        update["firmware"] = spec.firmware.model_copy(update={"nvram_volume": _own_name(spec.name, "nvram")})
    if spec.cloud_init is not None and not (spec.cloud_init.volume and spec.cloud_init.instance_id):
        update["cloud_init"] = spec.cloud_init.model_copy(update={
            "volume": spec.cloud_init.volume or _own_name(spec.name, "cidata"),
            "instance_id": spec.cloud_init.instance_id or f"iid-{spec.name}",
        })  # fmt: skip
    return spec.model_copy(update=update) if update else spec


def own_volumes(spec: VmSpec) -> dict[str, int]:
    """The VM's own volumes (variable store, seed) and the size each must have: created with the
    VM, deleted with it. Boot and data volumes are the user's and outlive it."""
    owned: dict[str, int] = {}
    if spec.firmware is not None and spec.firmware.nvram_volume:
        owned[spec.firmware.nvram_volume] = NVRAM_BYTES
    if spec.cloud_init is not None and spec.cloud_init.volume:
        owned[spec.cloud_init.volume] = CIDATA_BYTES
    return owned


def _own_name(vm: str, what: str) -> str:
    name = f"{vm}.{what}"
    if len(name) > 63:
        raise InvalidRequest(f"VM name {vm!r} is too long for its {what} volume {name!r} (volume names: at most 63)")
    return name


class VolumeOps:
    def __init__(self, store: Store, block: BlockdClient | None) -> None:
        self.store = store
        self.block = block

    def require_block(self) -> BlockdClient:
        if self.block is None:
            raise InvalidRequest("this VM has volumes but the LMO runs without blockd (start it with --blockd URL)")
        return self.block

    async def ensure_attached(self, spec: VmSpec, host: str) -> dict[str, NbdExport]:
        """This host's NBD export for every volume of ``spec`` (``VmSpec.volume_slots``: volume
        devices, a UEFI VM's variable store, its cloud-init seed), attaching what is missing."""
        slots = spec.volume_slots()
        if not slots:
            return {}
        block = self.require_block()
        exports = self.store.attachments(spec.name, host)
        for slot, volume in slots.items():
            if slot not in exports:
                self._refuse_while_transferring(volume)
                export = (await block.run(blockd.attach(volume, spec.name, host))).export()
                self.store.add_attachment(spec.name, host, slot, export)
                exports[slot] = export
        return exports

    def _refuse_while_transferring(self, volume: str) -> None:
        for doc in self.store.transfers(volume=volume):
            transfer = Transfer.model_validate_json(doc)
            raise Conflict(f"volume {volume!r} is being copied (transfer {transfer.id}, {transfer.mode.value}): "
                           "attach it when the copy is done", volume=volume, transfer=transfer.id)  # fmt: skip

    async def create_own(self, spec: VmSpec) -> list[str]:
        """Create the VM's own volumes that do not exist yet; returns those it created. An existing
        one is used if its size fits (a variable store kept from an earlier VM of that name)."""
        owned = own_volumes(spec)
        if not owned:
            return []
        block = self.require_block()
        created: list[str] = []
        try:
            for name, size in owned.items():
                try:
                    view = await block.run(blockd.volume(name))
                except errors.NotFound:
                    await block.run(blockd.create_volume(name, size))
                    created.append(name)
                    continue
                if view.size_bytes != size:
                    raise Conflict(f"volume {name!r} exists with {view.size_bytes} bytes; VM {spec.name} needs it "
                                   f"with {size}: delete it or name another", volume=name)  # fmt: skip
        except errors.LivemigError:
            await self.delete_volumes(created)
            raise
        return created

    async def delete_volumes(self, names: list[str]) -> None:
        """Delete volumes (already gone is fine). None to delete needs no blockd: a VM without
        volumes is deleted on an LMO that runs without one."""
        if not names:
            return
        block = self.require_block()
        for name in names:
            with contextlib.suppress(errors.NotFound):
                await block.run(blockd.delete_volume(name))

    async def fence(self, vm: str, host: str) -> None:
        """Fence the host's attachments explicitly: from now on its writes are rejected."""
        for export in self.store.attachments(vm, host).values():
            await self.require_block().run(blockd.fence(export.attachment))

    async def detach(self, vm: str, host: str) -> None:
        for export in self.store.attachments(vm, host).values():
            await self.require_block().detach_if_attached(export.attachment)
            self.store.deactivate_attachment(export.attachment)
