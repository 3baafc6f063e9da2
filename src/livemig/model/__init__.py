"""Typed records shared by every livemig process (VM specs, hosts, migrations)."""

from livemig.model.host import HostInfo, HostRegistration
from livemig.model.migration import (
    TERMINAL_PHASES,
    AutoConverge,
    Compression,
    Condition,
    ConditionType,
    Migration,
    MigrationParams,
    MigrationPolicies,
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
    VmSpec,
    VolumeDevice,
    WorkloadSpec,
)

__all__ = [
    "TERMINAL_PHASES",
    "AutoConverge",
    "BootSpec",
    "Compression",
    "Condition",
    "ConditionType",
    "Device",
    "HostInfo",
    "HostRegistration",
    "Migration",
    "MigrationParams",
    "MigrationPolicies",
    "MigrationSample",
    "MigrationStats",
    "NbdExport",
    "NicDevice",
    "Phase",
    "RngDevice",
    "TimelineEntry",
    "VmSpec",
    "VolumeDevice",
    "WorkloadSpec",
]
