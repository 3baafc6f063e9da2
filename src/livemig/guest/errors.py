"""Errors of the guest image builder.

Why a separate module: both the ``.modinfo`` parser (:mod:`livemig.guest.modules`) and the image
builder (:mod:`livemig.guest.image`) raise them, and the builder re-exports them, so callers write
``except livemig.guest.image.ImageBuildError``. They sit in the project's one exception tree
(:class:`livemig.errors.BootstrapError`: a prerequisite of this machine is missing or broken) and
are also ``RuntimeError`` for callers that only know the builder's original contract.
"""

from __future__ import annotations

from livemig.errors import BootstrapError


class ImageBuildError(BootstrapError, RuntimeError):
    """The guest image could not be built; the message says which step failed and why."""


class ModuleInfoError(ImageBuildError):
    """A kernel module file is not an ELF64 object with a readable ``.modinfo`` section."""


class ModuleDependencyError(ImageBuildError):
    """Module dependencies cannot be ordered: a dependency is missing, or they form a cycle."""
