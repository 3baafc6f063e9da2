"""Typed records shared by every livemig process (VM specs, hosts, migrations)."""

from livemig.model.host import HostInfo, HostRegistration
from livemig.model.migration import (
    TERMINAL_PHASES,
    Migration,
    MigrationParams,
    MigrationRequest,
    MigrationSample,
    MigrationStats,
    Phase,
    TimelineEntry,
)
from livemig.model.vm import (
    BootSpec,
    Device,
    NbdExport,
    NicDevice,
    RngDevice,
    VmLaunch,
    VmSpec,
    VmStatus,
    VolumeDevice,
    WorkloadSpec,
)

__all__ = [
    "TERMINAL_PHASES",
    "BootSpec",
    "Device",
    "HostInfo",
    "HostRegistration",
    "Migration",
    "MigrationParams",
    "MigrationRequest",
    "MigrationSample",
    "MigrationStats",
    "NbdExport",
    "NicDevice",
    "Phase",
    "RngDevice",
    "TimelineEntry",
    "VmLaunch",
    "VmSpec",
    "VmStatus",
    "VolumeDevice",
    "WorkloadSpec",
]
