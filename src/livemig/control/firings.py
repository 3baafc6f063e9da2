"""Copying fault firings into migration timelines: how the LMO learns what fired in other processes.

Why pull, and only when told: every service keeps its own firing log (``faults/registry.py``) and
puts the number of its latest firing in a header on every answer (``X-Livemig-Faults``) once
something has fired. The LMO already calls the hosts every pass, so it notices a new firing for
free and fetches ``GET /faults/firings?since=N`` only then; when a migration ends, it asks every
service the migration involved once more (a crashed service that restarted may not have been
called since), but only in a region where faults have been seen at all: outside chaos runs this
costs nothing. A firing belongs to a migration if it names it, or names its VM and came after it
was created.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque

from livemig.control.network import vm_vnics
from livemig.control.services import Services
from livemig.errors import LivemigError
from livemig.faults.model import Firing
from livemig.faults.registry import REGISTRY, FaultRegistry
from livemig.model.migration import Migration
from livemig.model.vm import VolumeDevice
from livemig.wire import faults as wire_faults
from livemig.wire.base import AsyncService

log = logging.getLogger(__name__)
#: firings remembered per remote service (enough for every migration in flight)
KEEP = 2000
#: a service asked for its firings gets this long to answer (it may be the one that is stopped)
FETCH_TIMEOUT_S = 2.0
#: how long the LMO keeps asking a service it could not reach when a migration ended (a crashed
#: service comes back within seconds; its firings, logged before it died, then reach the timeline)
LATE_SWEEP_S = 120.0


def belongs(firing: Firing, m: Migration) -> bool:
    if firing.migration is not None:
        return firing.migration == m.id
    return firing.vm == m.vm and firing.at >= m.created_at


class FiringCollector:
    def __init__(self, services: Services, replica: str = "", registry: FaultRegistry = REGISTRY) -> None:
        self.services = services
        self.replica = replica
        self.registry = registry
        self._fetched: dict[str, int] = {}  # service URL -> the last firing number read from it
        self._cache: dict[str, deque[Firing]] = {}
        # service URL -> (its client, until when to keep trying, ended migrations it owes firings to)
        self._late: dict[str, tuple[AsyncService, float, set[str]]] = {}

    @property
    def chaos_seen(self) -> bool:
        """Has anything ever been armed or fired here, or been reported by another service?"""
        return bool(self.registry.remote_seen or self.registry.seq or self.registry.armed)

    async def collect(self, m: Migration, final: bool = False) -> int:
        """Record in ``m``'s timeline every firing that belongs to it; returns how many were new."""
        added = sum(m.record_firing(f, self.replica) for f in self.registry.since(0) if belongs(f, m))
        if not self.chaos_seen:
            return added
        for url, client in self._involved(m).items():
            seen = self.registry.remote_seen.get(url)
            fetched = self._fetched.get(url, 0)
            if seen is not None and seen < fetched:
                fetched = 0  # the service restarted without its log: its numbers began again
            if (
                ((seen is not None and seen > fetched) or final)
                and not await self._fetch(url, client, fetched)
                and final
            ):
                _client, _until, owed = self._late.setdefault(url, (client, time.monotonic() + LATE_SWEEP_S, set()))
                owed.add(m.id)
            added += sum(m.record_firing(f, self.replica) for f in self._cache.get(url, ()) if belongs(f, m))
        return added

    async def sweep_late(self) -> int:
        """Ask again the services a migration could not reach when it ended, and put what they
        fired into those (ended) migrations' timelines; returns how many firings were added."""
        added = 0
        for url, (client, until, owed) in list(self._late.items()):
            if not await self._fetch(url, client, self._fetched.get(url, 0)):
                if time.monotonic() > until:
                    log.warning("firings of %s never read for migrations %s", url, sorted(owed))
                    del self._late[url]
                continue
            del self._late[url]
            for migration_id in owed:
                m = self.services.store.migration(migration_id)
                new = sum(m.record_firing(f, self.replica) for f in self._cache.get(url, ()) if belongs(f, m))
                if new:
                    self.services.store.save_migration(m)
                    added += new
        return added

    async def _fetch(self, url: str, client: AsyncService, since: int) -> bool:
        call = dataclasses.replace(wire_faults.firings(since), timeout=FETCH_TIMEOUT_S)
        try:
            new = await client.run(call)
        except LivemigError as exc:
            log.info("firings of %s not read now: %s", url, exc.message)
            return False
        cache = self._cache.setdefault(url, deque(maxlen=KEEP))
        known = {f.id for f in cache}
        cache.extend(f for f in new if f.id not in known)
        self._fetched[url] = max([since, *(f.seq for f in new)])
        return True

    def _involved(self, m: Migration) -> dict[str, AsyncService]:
        """The services ``m`` touches: both hosts, blockd (volumes), both vswitches (VNICs)."""
        found: dict[str, AsyncService] = {}
        for name in (m.source, m.destination):
            try:
                host = self.services.host(name)
            except LivemigError:
                continue
            found[host.base_url] = host
        try:
            spec, _ = self.services.store.vm(m.vm)
        except LivemigError:
            return found
        block = self.services.volumes.block
        if block is not None and any(isinstance(d, VolumeDevice) for d in spec.devices):
            found[block.base_url] = block
        if vm_vnics(spec):
            for name in (m.source, m.destination):
                try:
                    switch = self.services.network.switch(self.services.store.host(name))
                except LivemigError:
                    continue
                found[switch.base_url] = switch
        return found
