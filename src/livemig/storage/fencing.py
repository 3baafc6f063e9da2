"""Attachments and write fencing: at most one attachment of a volume may write, and it only moves forward.

The rule (why: a live migration attaches the destination while the source still runs, and a
write the source issued before the switch may reach blockd *after* the destination's first write;
applying it would silently corrupt the volume):

* Every attachment gets a generation, increasing across the whole blockd, at attach time.
* Each volume has one **writer**. The first write-class request (WRITE, TRIM, WRITE_ZEROES) from
  an attachment *newer* than the current writer (or when there is none) makes it the writer.
* From then on write-class requests from any *older* attachment are rejected with NBD ``EPERM``
  (chosen over ``ESHUTDOWN``: the spec obliges a client that sees ESHUTDOWN to disconnect, and a
  fenced source should keep *reading* - it stays runnable until it is told to stop) and counted
  per attachment. Reads are always allowed.
* An explicitly fenced or a detached attachment never writes again: a fence is never lifted, and
  the writer's generation never goes down, so nothing older can win again.
* The takeover is persisted (fsynced) before the new writer's first write is applied, and waits
  until writes already in flight from older attachments have landed, so no older write can be
  applied after a newer one.

``enabled=False`` (or ``LIVEMIG_BLOCKD_UNSAFE_NO_FENCING=1``) turns all of this off. It exists
only so a test can show the corruption that fencing prevents.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from livemig.errors import Conflict, InvalidRequest, NotFound
from livemig.statefile import StateFile

log = logging.getLogger(__name__)

UNSAFE_ENV = "LIVEMIG_BLOCKD_UNSAFE_NO_FENCING"
#: Log the 1st, then every Nth rejected write of an attachment (a stale guest can send thousands).
REJECT_LOG_EVERY = 100


def fencing_enabled_from_env() -> bool:
    """False only when the test-only unsafe switch is set."""
    return os.environ.get(UNSAFE_ENV, "") not in ("1", "true", "yes")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class Counters:
    """Per-attachment I/O counters (in memory; they restart from zero with blockd)."""

    reads: int = 0
    writes: int = 0
    rejected_writes: int = 0
    flushes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


@dataclass
class Attachment:
    """One attachment of a volume to a VM on a host."""

    id: str
    volume: str
    vm: str
    host: str
    generation: int
    secret_hash: str
    created_at: float
    fenced: bool = False
    detached: bool = False
    fence_reason: str | None = None
    counters: Counters = field(default_factory=Counters)
    inflight_writes: int = 0

    @property
    def active(self) -> bool:
        return not self.detached

    def to_state(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "volume": self.volume,
            "vm": self.vm,
            "host": self.host,
            "generation": self.generation,
            "secret_hash": self.secret_hash,
            "created_at": self.created_at,
            "fenced": self.fenced,
            "detached": self.detached,
            "fence_reason": self.fence_reason,
        }

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> Attachment:
        return cls(
            id=str(data["id"]),
            volume=str(data["volume"]),
            vm=str(data["vm"]),
            host=str(data["host"]),
            generation=int(data["generation"]),
            secret_hash=str(data["secret_hash"]),
            created_at=float(data["created_at"]),
            fenced=bool(data.get("fenced", False)),
            detached=bool(data.get("detached", False)),
            fence_reason=data.get("fence_reason"),
        )


class Decision(Enum):
    """What the fencing rule says about one write-class request."""

    ALLOW = "allow"
    TAKEOVER = "takeover"
    REJECT = "reject"


class FenceRegistry:
    """All attachments of all volumes, and each volume's writer. Lives in one event loop."""

    def __init__(self, state_path: Path | None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._state = StateFile(state_path) if state_path is not None else None
        self._attachments: dict[str, Attachment] = {}
        self._writers: dict[str, str] = {}
        self._generation = 0
        #: Volumes whose new writer waits for older in-flight writes; its writes wait on the event.
        self._barriers: dict[str, asyncio.Event] = {}
        self._idle_waiters: list[asyncio.Future[None]] = []
        #: write-class requests refused by fencing since blockd started (detached attachments' too)
        self.rejected_writes = 0
        if not enabled:
            log.warning("FENCING DISABLED (%s): stale writes WILL be applied; tests only", UNSAFE_ENV)
        saved = self._state.load() if self._state is not None else None
        if saved:
            self._generation = int(saved.get("generation", 0))
            self._writers = {str(k): str(v) for k, v in saved.get("writers", {}).items()}
            for entry in saved.get("attachments", []):
                attachment = Attachment.from_state(entry)
                self._attachments[attachment.id] = attachment

    # --- lifecycle -------------------------------------------------------------------------------

    def attach(self, volume: str, vm: str, host: str) -> tuple[Attachment, str]:
        """New attachment (newest generation so far) and its secret, which is returned only here."""
        if not vm.strip() or not host.strip():
            raise InvalidRequest("vm and host must be non-empty")
        self._generation += 1
        secret = secrets.token_hex(16)
        attachment = Attachment(
            id=secrets.token_hex(8),
            volume=volume,
            vm=vm,
            host=host,
            generation=self._generation,
            secret_hash=hash_secret(secret),
            created_at=time.time(),
        )
        self._attachments[attachment.id] = attachment
        try:
            self._save()
        except Exception:
            del self._attachments[attachment.id]
            raise
        log.info(
            "attached volume %s for vm %s on %s: %s (generation %d)",
            volume,
            vm,
            host,
            attachment.id,
            attachment.generation,
        )
        return attachment, secret

    async def detach(self, attachment_id: str) -> Attachment:
        """Detach (idempotent): no I/O from it is accepted again; waits for its writes in flight.

        It takes effect at once and is acknowledged once it is on disk: every call saves, so that
        a retry after a save that failed (a full disk) is answered only once the detach persists,
        never by the flag a failed call left in memory (a restart would bring the attachment back)."""
        attachment = self.get(attachment_id)
        if not attachment.detached:
            attachment.detached = True
            log.info("detached %s (volume %s, vm %s)", attachment.id, attachment.volume, attachment.vm)
        self._save()
        await self.wait_idle(attachment)
        return attachment

    async def fence(self, attachment_id: str, reason: str = "fenced by API") -> Attachment:
        """Fence (idempotent): its writes are rejected from now on; returns once none is in flight.
        Like a detach, it applies at once and is acknowledged once it is on disk (every call saves)."""
        attachment = self.get(attachment_id)
        if attachment.detached:
            raise Conflict(f"attachment {attachment_id} is detached", attachment=attachment_id)
        if not attachment.fenced:
            attachment.fenced = True
            attachment.fence_reason = reason
            log.warning(
                "fenced %s (volume %s, vm %s on %s): %s",
                attachment.id,
                attachment.volume,
                attachment.vm,
                attachment.host,
                reason,
            )
        self._save()
        await self.wait_idle(attachment)
        return attachment

    def forget_volume(self, volume: str) -> None:
        """Drop all (detached) attachments of a deleted volume."""
        if any(a.active for a in self.of_volume(volume)):
            raise Conflict(f"volume {volume!r} still has attachments", volume=volume)
        for attachment in self.of_volume(volume, include_detached=True):
            del self._attachments[attachment.id]
        self._writers.pop(volume, None)
        self._save()

    # --- queries ---------------------------------------------------------------------------------

    def get(self, attachment_id: str) -> Attachment:
        try:
            return self._attachments[attachment_id]
        except KeyError:
            raise NotFound(f"no attachment {attachment_id!r}", attachment=attachment_id) from None

    def of_volume(self, volume: str, *, include_detached: bool = False) -> list[Attachment]:
        found = [a for a in self._attachments.values() if a.volume == volume and (include_detached or a.active)]
        return sorted(found, key=lambda a: a.generation)

    def all(self) -> list[Attachment]:
        return sorted(self._attachments.values(), key=lambda a: a.generation)

    def writer_of(self, volume: str) -> str | None:
        return self._writers.get(volume)

    def is_writer(self, attachment: Attachment) -> bool:
        return self._writers.get(attachment.volume) == attachment.id

    def check_secret(self, attachment: Attachment, secret: str) -> bool:
        return hmac.compare_digest(attachment.secret_hash, hash_secret(secret))

    # --- the rule --------------------------------------------------------------------------------

    def decide(self, attachment: Attachment) -> Decision:
        """The fencing rule for one write-class request, without side effects."""
        if not self.enabled:
            return Decision.ALLOW
        if attachment.fenced or attachment.detached:
            return Decision.REJECT
        writer_id = self._writers.get(attachment.volume)
        if writer_id == attachment.id:
            return Decision.ALLOW
        writer = self._attachments.get(writer_id) if writer_id else None
        if writer is None or attachment.generation > writer.generation:
            return Decision.TAKEOVER
        return Decision.REJECT

    def try_begin_write(self, attachment: Attachment) -> bool | None:
        """Admit a write without waiting: True (admitted, call :meth:`end_write`), False (rejected
        and counted), None (a takeover or barrier is involved: use :meth:`begin_write`)."""
        decision = self.decide(attachment)
        if decision is Decision.REJECT:
            self._count_rejection(attachment)
            return False
        if decision is Decision.TAKEOVER or attachment.volume in self._barriers:
            return None
        attachment.inflight_writes += 1
        return True

    async def begin_write(self, attachment: Attachment) -> bool:
        """Admit a write, taking over as writer if the rule says so; False means rejected (counted)."""
        while True:
            decision = self.decide(attachment)
            if decision is Decision.REJECT:
                self._count_rejection(attachment)
                return False
            if decision is Decision.TAKEOVER:
                await self._take_over(attachment)
                continue
            barrier = self._barriers.get(attachment.volume)
            if barrier is not None:
                await barrier.wait()
                continue  # re-judge: a fence or another takeover may have happened meanwhile
            attachment.inflight_writes += 1
            return True

    def end_write(self, attachment: Attachment) -> None:
        attachment.inflight_writes -= 1
        if attachment.inflight_writes == 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_idle(self, attachment: Attachment) -> None:
        """Until no write of ``attachment`` is in flight."""
        await self._wait_until(lambda: attachment.inflight_writes == 0)

    # --- internals -------------------------------------------------------------------------------

    async def _take_over(self, attachment: Attachment) -> None:
        volume = attachment.volume
        previous = self._writers.get(volume)
        self._writers[volume] = attachment.id
        try:
            self._save()
        except Exception:
            if previous is None:
                self._writers.pop(volume, None)
            else:
                self._writers[volume] = previous
            raise
        if previous is None:
            log.info(
                "volume %s: attachment %s (vm %s on %s) is the first writer",
                volume,
                attachment.id,
                attachment.vm,
                attachment.host,
            )
        else:
            log.warning(
                "volume %s: attachment %s (vm %s on %s, generation %d) took over as writer from %s; "
                "writes from older attachments are rejected from now on",
                volume,
                attachment.id,
                attachment.vm,
                attachment.host,
                attachment.generation,
                previous,
            )
        others = [a for a in self.of_volume(volume, include_detached=True) if a.id != attachment.id]
        if not any(a.inflight_writes for a in others):
            return
        barrier = self._barriers.setdefault(volume, asyncio.Event())
        try:
            await self._wait_until(lambda: not any(a.inflight_writes for a in others))
        finally:
            if self._barriers.get(volume) is barrier:
                del self._barriers[volume]
            barrier.set()

    async def _wait_until(self, condition: Any) -> None:
        loop = asyncio.get_running_loop()
        while not condition():
            waiter: asyncio.Future[None] = loop.create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _count_rejection(self, attachment: Attachment) -> None:
        self.rejected_writes += 1
        attachment.counters.rejected_writes += 1
        n = attachment.counters.rejected_writes
        if n == 1 or n % REJECT_LOG_EVERY == 0:
            why = (
                attachment.fence_reason
                if attachment.fenced
                else ("detached" if attachment.detached else f"writer is now {self._writers.get(attachment.volume)}")
            )
            log.warning(
                "volume %s: rejected write #%d from stale attachment %s (vm %s on %s): %s",
                attachment.volume,
                n,
                attachment.id,
                attachment.vm,
                attachment.host,
                why,
            )

    def _save(self) -> None:
        if self._state is None:
            return
        self._state.save(
            {
                "generation": self._generation,
                "writers": dict(sorted(self._writers.items())),
                "attachments": [a.to_state() for a in self.all()],
            }
        )
