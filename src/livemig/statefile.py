"""Crash-safe JSON state: write a temp file, fsync it, rename over the old one, fsync the directory.

Why not SQLite: blockd's metadata is a few kilobytes that change a handful of times per migration;
one atomically replaced file is simpler to reason about after ``kill -9`` (either the old or the
new document is there, never half of one) and is readable with ``cat`` when debugging.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from livemig.errors import LivemigError


class StateFile:
    """One JSON document at ``path``, replaced atomically and durably on every save."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any] | None:
        """The last saved document, or None if none was ever saved."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LivemigError(f"state file {self.path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise LivemigError(f"state file {self.path} does not hold a JSON object")
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Durably replace the document; when this returns, a crash cannot undo it."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        payload = json.dumps(data, indent=1, sort_keys=True).encode()
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
