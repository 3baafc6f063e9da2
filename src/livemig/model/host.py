"""Hosts as the LMO knows them and as they describe themselves."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class HostRegistration(BaseModel):
    """What the LMO needs to reach a host: its API and its dedicated migration address."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9-]{0,62}$")
    api_url: str = Field(pattern=r"^https?://")
    migration_address: str = Field(min_length=1)
    migration_bandwidth_mib_s: int = Field(default=1024, ge=1, le=1_000_000,
                                           description="budget reserved for migrations, in and out each")  # fmt: skip
    maintenance: bool = Field(default=False, description="no new placements; being evacuated")
    vswitch_url: str | None = Field(default=None, description="this host's vswitch API (VCN dataplane)")
    overlay: str | None = Field(default=None, description="this host's VXLAN endpoint ip:port")
    # what the host can hold, reported by hostd when it registers and whenever it changes: the LMO
    # places VMs from these (and what it placed itself), never by asking every host
    memory_mib: int | None = Field(default=None, ge=0, description="memory offered to VMs")
    memory_used_mib: int | None = Field(default=None, ge=0, description="memory its VMs use now (observed)")
    accel: str | None = None
    qemu_version: str | None = None
    machines: list[str] = Field(default_factory=list, description="versioned machine types QEMU offers")


class HostInfo(BaseModel):
    """What a hostd reports about itself (observed, never desired state)."""

    name: str
    migration_address: str
    accel: str
    accel_reason: str
    qemu_version: str
    memory_mib: int
    memory_used_mib: int
    migration_bandwidth_mib_s: int = 1024
    vms: list[str] = Field(default_factory=list)
    machines: list[str] = Field(default_factory=list, description="versioned machine types QEMU offers")
    firmware: dict[str, str] = Field(default_factory=dict,
                                     description="firmware builds offered (seabios, ovmf-4m, ...) -> SHA-256 of "
                                     "their code: a VM moves only to a host with its very build")  # fmt: skip
    refused_records: list[str] = Field(default_factory=list,
                                       description="VM records hostd did not trust at start (corrupt, torn, "
                                       "or from a newer livemig); their VMs were not adopted")  # fmt: skip

    @property
    def memory_free_mib(self) -> int:
        return self.memory_mib - self.memory_used_mib
