"""Attaching a VM's volumes on a host, and letting go of them: one place for the VM-create,
VM-delete and migration paths. Every call is idempotent (the store remembers attachments), so a
restarted LMO repeating a step never attaches twice."""

from __future__ import annotations

from livemig.control.store import Store
from livemig.errors import InvalidRequest
from livemig.model.vm import NbdExport, VmSpec, VolumeDevice
from livemig.wire import blockd
from livemig.wire.blockd import BlockdClient


class VolumeOps:
    def __init__(self, store: Store, block: BlockdClient | None) -> None:
        self.store = store
        self.block = block

    def _require_block(self) -> BlockdClient:
        if self.block is None:
            raise InvalidRequest("this VM has volumes but the LMO runs without blockd (start it with --blockd URL)")
        return self.block

    async def ensure_attached(self, spec: VmSpec, host: str) -> dict[str, NbdExport]:
        """This host's NBD export for every volume device of ``spec`` (attaching what is missing)."""
        devices = [d for d in spec.devices if isinstance(d, VolumeDevice)]
        if not devices:
            return {}
        block = self._require_block()
        exports = self.store.attachments(spec.name, host)
        for device in devices:
            if device.id not in exports:
                export = (await block.run(blockd.attach(device.volume, spec.name, host))).export()
                self.store.add_attachment(spec.name, host, device.id, export)
                exports[device.id] = export
        return exports

    async def fence(self, vm: str, host: str) -> None:
        """Fence the host's attachments explicitly: from now on its writes are rejected."""
        for export in self.store.attachments(vm, host).values():
            await self._require_block().run(blockd.fence(export.attachment))

    async def detach(self, vm: str, host: str) -> None:
        for export in self.store.attachments(vm, host).values():
            await self._require_block().detach_if_attached(export.attachment)
            self.store.deactivate_attachment(export.attachment)
