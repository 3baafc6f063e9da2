"""Where a new VM runs: the in-service host with the most free memory that can hold it.

Free memory comes from the LMO's own inventory (``Store.place_vm``): what each host reported it
offers and uses, and what the LMO placed or reserved there itself. One indexed query and one
conditional update choose and claim the room, so creating a VM costs the same with ten hosts or
ten thousand, and two requests (or replicas) never overfill a host. The chosen host is asked only
to start the VM; if it does not answer, the room is given back and the next host is tried.
The store's calls run on a worker thread, so that the LMO's other requests go on meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from livemig.control.services import Services
from livemig.errors import HostUnreachable
from livemig.model.host import HostRegistration
from livemig.model.vm import VmSpec

T = TypeVar("T")
#: hosts tried in turn when the chosen one does not answer (a host named by the caller: only it)
ATTEMPTS = 3


async def place_and_start(services: Services, spec: VmSpec, wanted: str | None,
                          start: Callable[[str], Awaitable[T]]) -> tuple[str, T]:  # fmt: skip
    """Claim room for ``spec`` (on ``wanted`` if given), then ``start(host)``; on any failure the
    claim is undone. Raises NotFound/Conflict/CapacityError before anything starts."""
    unreachable: list[str] = []
    while True:
        host = await _claim(services, spec, wanted, unreachable)
        try:
            return host, await start(host)
        except HostUnreachable:
            await asyncio.to_thread(services.store.remove_vm, spec.name)
            unreachable.append(host)
            if wanted is not None or len(unreachable) >= ATTEMPTS:
                raise
        except BaseException:
            services.store.remove_vm(spec.name)  # on the loop: a cancelled request must still give the room back
            raise


async def _claim(services: Services, spec: VmSpec, wanted: str | None, exclude: list[str]) -> str:
    """``Store.place_vm`` on a worker thread; the host's registration it read is kept for the
    call to the host that follows. A request cancelled meanwhile does not stop the thread: the
    room it claims is given back as soon as it is claimed."""
    claim = asyncio.ensure_future(asyncio.to_thread(services.store.place_vm, spec, wanted, exclude=exclude))
    try:
        registration = await asyncio.shield(claim)
    except asyncio.CancelledError:

        def give_back(done: asyncio.Future[HostRegistration]) -> None:
            if not done.cancelled() and done.exception() is None:
                services.store.remove_vm(spec.name)

        claim.add_done_callback(give_back)
        raise
    services.registrations.remember(registration)
    return registration.name
