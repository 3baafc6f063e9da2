"""The fault boundary (a chaos run or a test → any service): arm, release and disarm fault points,
and read what fired. Every service serves these routes (``faults/api.py``), so each ``Call`` here
runs on any client: ``HostdClient``, ``BlockdClient``, ``VswitchClient``, ``LmoClient``.
"""

from __future__ import annotations

from livemig.faults.model import Action, ArmedFault, ArmRequest, FaultsView, Firing, Scope
from livemig.wire.base import Call, call

__all__ = ["Action", "ArmRequest", "ArmedFault", "FaultsView", "Firing", "Scope", "arm", "disarm", "disarm_all",
           "faults", "firings", "release"]  # fmt: skip


def faults() -> Call[FaultsView]:
    return call("GET", "/faults", FaultsView)


def arm(request: ArmRequest) -> Call[ArmedFault]:
    return call("POST", "/faults", ArmedFault, json=request)


def disarm(arm_id: str) -> Call[ArmedFault]:
    return call("DELETE", f"/faults/{arm_id}", ArmedFault)


def disarm_all() -> Call[None]:
    return call("DELETE", "/faults")


def release(arm_id: str) -> Call[ArmedFault]:
    return call("POST", f"/faults/{arm_id}/release", ArmedFault)


def firings(since: int = 0) -> Call[list[Firing]]:
    return call("GET", "/faults/firings", list[Firing], params={"since": since} if since else None)
