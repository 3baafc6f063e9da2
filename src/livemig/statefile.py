"""Crash-safe, versioned JSON state: write a temp file, fsync it, rename over the old one, fsync
the directory. blockd keeps its volumes and attachments this way, hostd each VM's record.

Why not SQLite: this metadata is a few kilobytes that change a handful of times per migration;
one atomically replaced file is simpler to reason about after ``kill -9`` (either the old or the
new document is there, never half of one) and is readable with ``cat`` when debugging.

Why a version: a record written by a newer livemig may mean something this one cannot know, so
it is refused with a clear error rather than half-read. A record without one predates versions
and is format 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from livemig.errors import StateError


class StateFile:
    """One JSON document at ``path``, replaced atomically and durably on every save.

    ``version`` is the format this code writes and the newest it reads."""

    def __init__(self, path: Path, version: int = 1) -> None:
        self.path = path
        self.version = version

    def load(self) -> dict[str, Any] | None:
        """The last saved document, or None if none was ever saved."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"state file {self.path} cannot be read: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StateError(f"state file {self.path} is corrupt or torn (not valid JSON: {exc})") from exc
        if not isinstance(data, dict):
            raise StateError(f"state file {self.path} does not hold a JSON object")
        found = data.get("version", 1)
        if not isinstance(found, int) or found < 1:
            raise StateError(f"state file {self.path} has an invalid format version {found!r}")
        if found > self.version:
            raise StateError(f"state file {self.path} was written by a newer livemig (format {found}; this one "
                             f"reads up to {self.version}): refusing to guess what it means")  # fmt: skip
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Durably replace the document; when this returns, a crash cannot undo it."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        payload = json.dumps({**data, "version": self.version}, indent=1, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename/create/unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
