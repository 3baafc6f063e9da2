"""The records of fault injection, shared by every service's fault API and its callers.

Why here and not in ``livemig.wire``: the fault registry sits under ``wire/base.py`` (every client
call is a fault point), so its records cannot import the wire package; ``wire/faults.py`` re-exports
them next to the routes.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Action(StrEnum):
    """What an armed point does when it fires.

    ``crash``: SIGKILL the service itself (no cleanup, no flush: a power cut). ``error``: raise
    ``InjectedFault`` (an API answers 500, a QMP command fails). ``delay``: sleep ``seconds``.
    ``hang``: block the caller until the arm is released or disarmed (at most ``seconds``, if set).
    ``hold``: at a step point the caller skips its step and stays where it is (the controller
    stays in its phase); on a data path (an NBD request, an overlay datagram) the request waits
    until released, as ``hang``. ``drop``: on a data path the request or frame is dropped, never
    answered or sent; at a step point, as ``hold``.
    """

    CRASH = "crash"
    ERROR = "error"
    DELAY = "delay"
    HANG = "hang"
    HOLD = "hold"
    DROP = "drop"


class Scope(BaseModel):
    """Which firings an arm is limited to (every field left out matches anything)."""

    model_config = ConfigDict(extra="forbid")

    migration: str | None = Field(default=None, description="a migration id (the LMO tells services which)")
    vm: str | None = Field(default=None, description="a VM name")
    host: str | None = Field(default=None, description="the host the point runs for (hostd's, an attachment's)")

    def covers(self, other: Scope) -> bool:
        """True if every field this scope names is the same in ``other``."""
        return (
            (self.migration is None or self.migration == other.migration)
            and (self.vm is None or self.vm == other.vm)
            and (self.host is None or self.host == other.host)
        )


class ArmRequest(BaseModel):
    """``POST /faults``: arm ``point`` (a name, or a shell pattern such as ``hostd.src.qmp.*``)."""

    model_config = ConfigDict(extra="forbid")

    point: str = Field(min_length=1, max_length=300)
    action: Action
    seconds: float | None = Field(
        default=None, ge=0, le=3600, description="delay: how long; hang/hold: the longest wait (default: no limit)"
    )
    scope: Scope = Field(default_factory=Scope)
    count: int | None = Field(
        default=1, ge=1, le=1_000_000, description="fire this many times, then disarm (null: every time)"
    )
    after: int = Field(default=0, ge=0, le=1_000_000, description="let this many matching hits pass first")

    @model_validator(mode="after")
    def _delay_needs_seconds(self) -> ArmRequest:
        if self.action is Action.DELAY and self.seconds is None:
            raise ValueError("a delay needs seconds")
        return self

    def describe(self) -> str:
        action = self.action.value if self.seconds is None else f"{self.action.value}:{self.seconds:g}"
        return f"{self.point}={action}"


class ArmedFault(ArmRequest):
    """An arm as its service holds it: how often it matched, fired, and who waits on it now."""

    id: str
    service: str
    hits: int = 0
    fired: int = 0
    waiting: int = Field(default=0, description="callers hanging or held at this arm right now")


class Firing(BaseModel):
    """One time a point fired: what the service recorded (and the LMO copies into the timeline)."""

    id: str = Field(description="unique across restarts: service, host, pid and sequence")
    seq: int = Field(description="this service's firing counter (kept across its restarts)")
    at: datetime
    service: str
    point: str
    action: str
    migration: str | None = None
    vm: str | None = None
    host: str | None = None
    arm: str = Field(default="", description="the id of the arm that fired ('plan' for LIVEMIG_FAULTS)")


class FaultsView(BaseModel):
    """``GET /faults``: a service's arms and how many firings it has recorded."""

    service: str
    host: str | None = None
    armed: list[ArmedFault] = Field(default_factory=list)
    fired: int = Field(default=0, description="the sequence number of the latest firing")
