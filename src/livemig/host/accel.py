"""Choosing the accelerator: KVM only where a real KVM module is loaded, else TCG.

Why not just test ``/dev/kvm``: some machines (this project's CI among them) expose ``/dev/kvm``
from a paravirtual module that cannot boot a standard guest kernel. Only ``kvm_intel`` or
``kvm_amd`` mean hardware virtualization a stock kernel can use. The choice is overridable with
``--accel`` or ``LIVEMIG_ACCEL`` and always reported with its reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from livemig.errors import InvalidRequest

HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd")
ACCELERATORS = ("auto", "kvm", "tcg")


@dataclass(frozen=True)
class AccelChoice:
    name: str  # "kvm" or "tcg"
    reason: str


def choose_accel(requested: str | None = None, sys_module: Path = Path("/sys/module")) -> AccelChoice:
    """Resolve ``auto``/``kvm``/``tcg`` (argument, else ``LIVEMIG_ACCEL``, else ``auto``)."""
    wanted = (requested or os.environ.get("LIVEMIG_ACCEL") or "auto").lower()
    if wanted not in ACCELERATORS:
        raise InvalidRequest(f"accelerator {wanted!r} is not one of {', '.join(ACCELERATORS)}")
    if wanted == "tcg":
        return AccelChoice("tcg", "requested explicitly")
    loaded = [m for m in HARDWARE_KVM_MODULES if (sys_module / m).exists()]
    if wanted == "kvm":
        return AccelChoice("kvm", "requested explicitly" + ("" if loaded else " (no kvm_intel/kvm_amd)"))
    if loaded and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice("kvm", f"{loaded[0]} is loaded and /dev/kvm is usable")
    return AccelChoice("tcg", "neither kvm_intel nor kvm_amd is loaded")
