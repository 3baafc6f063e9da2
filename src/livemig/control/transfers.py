"""Transfers: short-lived NBD attachments through which the CLI copies images into and out of volumes.

Why through the LMO and not straight to blockd: the LMO is the one that knows which volumes VMs
use. It refuses a transfer on a volume a VM has attached (an import would overwrite a running
guest's disk; an export would copy a disk mid-write) and refuses to attach a volume to a VM while
a transfer is open on it. The client gets an attachment of its own, a new generation like any
other: if a VM's attachment ever wrote after it, blockd's fencing would refuse the older
transfer's writes.

Why a lease: the client detaches when it is done or fails, but a client killed mid-copy cannot.
Every transfer expires ``ttl_s`` after it was opened or last renewed; the client renews it while
it copies, and :func:`sweep_forever` detaches the expired ones, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from livemig.control.volumes import VolumeOps
from livemig.errors import Conflict, LivemigError
from livemig.wire import blockd
from livemig.wire.lmo import Transfer, TransferRequest

log = logging.getLogger(__name__)

#: the host name blockd records for transfer attachments (no VM runs there)
TRANSFER_HOST = "transfer"
SWEEP_INTERVAL_S = 2.0


class TransferOps:
    def __init__(self, volumes: VolumeOps) -> None:
        self.volumes = volumes
        self.store = volumes.store

    def _open_on(self, volume: str) -> list[Transfer]:
        return [Transfer.model_validate_json(doc) for doc in self.store.transfers(volume=volume)]

    async def open(self, volume: str, request: TransferRequest) -> Transfer:
        block = self.volumes.require_block()
        view = await block.run(blockd.volume(volume))
        for other in self._open_on(volume):
            raise Conflict(f"volume {volume!r} already has transfer {other.id} open ({other.mode.value}); "
                           "wait for it or close it", volume=volume, transfer=other.id)  # fmt: skip
        for attachment in await block.run(blockd.attachments(volume)):
            raise Conflict(
                f"volume {volume!r} is attached to VM {attachment.vm} on host {attachment.host}: "
                f"delete the VM before copying an image {'into' if request.mode.value == 'write' else 'out of'} it",
                volume=volume, vm=attachment.vm, host=attachment.host,
            )  # fmt: skip
        transfer_id = uuid.uuid4().hex[:16]
        reply = await block.run(blockd.attach(volume, f"transfer-{transfer_id}", TRANSFER_HOST))
        transfer = Transfer(id=transfer_id, volume=volume, mode=request.mode, size_bytes=view.size_bytes,
                            allocated_bytes=view.allocated_bytes, export=reply.export(),
                            expires_at=time.time() + request.ttl_s)  # fmt: skip
        try:
            self.store.add_transfer(transfer.id, volume, transfer.model_dump_json(), transfer.expires_at)
        except Exception:
            await block.detach_if_attached(reply.id)  # never an attachment the store does not know
            raise
        log.info("transfer %s opened on volume %s (%s, attachment %s)", transfer.id, volume, request.mode.value,
                 reply.id)  # fmt: skip
        return transfer

    def get(self, transfer_id: str) -> Transfer:
        return Transfer.model_validate_json(self.store.transfer(transfer_id))

    def renew(self, transfer_id: str, ttl_s: float) -> Transfer:
        transfer = self.get(transfer_id).model_copy(update={"expires_at": time.time() + ttl_s})
        self.store.update_transfer(transfer_id, transfer.model_dump_json(), transfer.expires_at)
        return transfer

    async def close(self, transfer_id: str) -> None:
        """Detach the transfer's attachment and forget it (NotFound once it is gone)."""
        transfer = self.get(transfer_id)
        await self.volumes.require_block().detach_if_attached(transfer.export.attachment)
        self.store.remove_transfer(transfer_id)
        log.info("transfer %s on volume %s closed", transfer_id, transfer.volume)

    async def sweep(self, now: float | None = None) -> list[str]:
        """Close every transfer whose lease ran out; returns their ids."""
        closed: list[str] = []
        for doc in self.store.transfers(expired_before=time.time() if now is None else now):
            transfer = Transfer.model_validate_json(doc)
            try:
                await self.close(transfer.id)
            except LivemigError as exc:  # blockd unreachable: the next sweep tries again
                log.warning("expired transfer %s not closed yet: %s", transfer.id, exc.message)
                continue
            log.warning("transfer %s on volume %s expired (its client stopped renewing it)", transfer.id,
                        transfer.volume)  # fmt: skip
            closed.append(transfer.id)
        return closed


async def sweep_forever(transfers: TransferOps, interval_s: float = SWEEP_INTERVAL_S) -> None:
    while True:
        with contextlib.suppress(LivemigError):
            await transfers.sweep()
        await asyncio.sleep(interval_s)
