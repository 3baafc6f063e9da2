"""Where a new VM runs: the in-service host with the most free memory that can hold it.

Free memory comes from each host's own report (``GET /host``), asked of every host in service
at once; a host that does not answer is not a candidate.
"""

from __future__ import annotations

import asyncio

from livemig.control.services import Services
from livemig.errors import CapacityError, Conflict, HostUnreachable, LivemigError
from livemig.model.host import HostInfo
from livemig.model.vm import VmSpec
from livemig.wire import hostd


async def choose_host(services: Services, spec: VmSpec, wanted: str | None = None) -> str:
    """The host for ``spec`` (``wanted`` if given and able); a clear 409/502 when none fits."""
    candidates = [reg for reg in services.store.hosts() if not reg.maintenance]
    if wanted is not None:
        if services.store.host(wanted).maintenance:  # 404 for an unknown host
            raise Conflict(f"host {wanted} is in maintenance: no new VMs")
        candidates = [reg for reg in candidates if reg.name == wanted]
    reports = await asyncio.gather(*(_info(services, reg.name) for reg in candidates))
    answered = {name: info for name, info in zip((r.name for r in candidates), reports, strict=True) if info}
    if wanted is not None and not answered:
        raise HostUnreachable(f"host {wanted} does not answer")
    fitting = {name: info for name, info in answered.items() if info.memory_free_mib >= spec.memory_mib}
    if not fitting:
        best = max((info.memory_free_mib for info in answered.values()), default=0)
        raise CapacityError(f"no host can hold {spec.memory_mib} MiB (most free: {best} MiB)")
    return max(fitting, key=lambda name: fitting[name].memory_free_mib)


async def _info(services: Services, host: str) -> HostInfo | None:
    try:
        return await services.host(host).run(hostd.info())
    except LivemigError:
        return None
