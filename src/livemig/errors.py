"""One exception tree for every livemig process.

Why one tree: the REST layers map an exception class to an HTTP status in one place, and the
CLI prints a one-line message for any ``LivemigError`` instead of a stack trace::

    LivemigError                    base; carries a human message (and optional details)
    ├── InvalidRequest      400/422 a request or VM spec that is malformed or contradictory
    ├── NotFound            404     unknown VM, host or migration
    ├── Conflict            409     name taken, VM busy, migrate to the host it is on
    ├── CapacityError       409     destination cannot hold the VM
    ├── HostUnreachable     502     a hostd did not answer
    ├── QemuError           500     QEMU refused to start or a QMP command failed
    ├── GuestError          500     the guest workload did not answer or reported a failure
    ├── StateError          500     a persisted record is corrupt, torn, or from a newer livemig
    ├── InjectedFault       500     a fault point armed by a test or a chaos plan fired
    ├── CredentialError     500     a certificate or key is missing, malformed or not of this region
    ├── Unauthenticated     401     the caller proved no identity
    ├── Forbidden           403     the caller's identity (role) may not do this
    └── BootstrapError      -       a prerequisite (package, image) is missing on this machine
"""

from __future__ import annotations

from typing import Any


class LivemigError(Exception):
    """Base of every error livemig raises on purpose."""

    http_status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The JSON body every API returns for this error."""
        return {"error": type(self).__name__, "message": self.message, **self.details}


class InvalidRequest(LivemigError):
    """Input that can never succeed as given (bad spec, bad field)."""

    http_status = 422


class NotFound(LivemigError):
    """A named thing (VM, host, migration) does not exist."""

    http_status = 404


class Conflict(LivemigError):
    """The request clashes with current state (name taken, VM busy, same host)."""

    http_status = 409


class CapacityError(Conflict):
    """The destination has not enough free memory (or other capacity) for the VM."""


class HostUnreachable(LivemigError):
    """A host agent did not answer; the caller should observe again before acting."""

    http_status = 502


class QemuError(LivemigError):
    """QEMU refused to start, died, or rejected a QMP command."""


class GuestError(LivemigError):
    """The guest workload did not answer, or its self-check failed."""


class StateError(LivemigError):
    """A persisted record (hostd's VM record, blockd's metadata) cannot be trusted as read."""


class InjectedFault(LivemigError):
    """Raised by a fault point armed with ``error`` (tests, chaos plans): never in normal operation."""


class BootstrapError(LivemigError):
    """The machine lacks a prerequisite (a Debian package, the guest image)."""


class CredentialError(LivemigError):
    """A certificate or key is missing, malformed, expired, or not issued by this region's CA."""


class Unauthenticated(LivemigError):
    """The caller proved no identity (no credential, or one that is not valid)."""

    http_status = 401


class Forbidden(LivemigError):
    """The caller is known, but its role may not do this (a valid certificate of the wrong role)."""

    http_status = 403
