"""Config files: the services' (``livemig hostd --config hostd.toml``) and the CLI user's (``client.toml``).

Why TOML: a person writes these on a host (``deploy/``), and Python reads TOML without a
dependency (``tomllib``). A service's file holds the same settings as its flags, named like them
(``migration_address = "10.1.0.11"`` for ``--migration-address``); a flag given on the command line
wins over the file, the file over the built-in default. An unknown key is refused by name, so a
typo never silently falls back to a default.

The CLI user's file (``livemig up`` writes one into the region's state dir, mode 0600) holds the
LMO's URL, the region CA to trust and the user's bearer token; ``$LIVEMIG_URL``, ``$LIVEMIG_CA``
and ``$LIVEMIG_TOKEN`` override its entries, ``--config``/``$LIVEMIG_CONFIG`` name another file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from livemig.errors import InvalidRequest
from livemig.security.pki import atomic_write  # the same write-fsync-rename as the PKI's files

CLIENT_FILE = "client.toml"


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InvalidRequest(f"no config file at {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidRequest(f"{path} is not a readable TOML file: {exc}") from None


def _quote(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_toml(path: Path, values: dict[str, object], *, comment: str = "", mode: int = 0o644) -> Path:
    """A flat TOML file (strings, numbers, booleans, lists of strings); None values are left out."""
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            lines.append(f"{key} = [{', '.join(_quote(v) for v in value)}]")
        else:
            lines.append(f"{key} = {_quote(value)}")
    atomic_write(path, ("\n".join(lines) + "\n").encode(), mode)
    return path


def load_into_defaults(ctx: typer.Context, _param: Any, value: Path | None) -> Path | None:
    """The ``--config`` option's callback: the file's settings become the command's defaults."""
    if value is None:
        return None
    data = read_toml(value)
    names: dict[str, str] = {}  # a setting's key (the flag's name, or the parameter's) -> the parameter
    for param in ctx.command.params:
        if param.name is None or param.name == "config" or param.param_type_name != "option":
            continue
        names[param.name] = param.name
        for opt in param.opts:
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = param.name
    settings: dict[str, Any] = {}
    for key, item in data.items():
        name = names.get(key.replace("-", "_"))
        if name is None:
            known = ", ".join(sorted({k for k, v in names.items() if k == v or k not in names.values()}))
            raise typer.BadParameter(f"{value}: unknown setting {key!r} (known: {known})", ctx=ctx)
        settings[name] = [str(v) for v in item] if isinstance(item, list) else item
    ctx.default_map = {**(ctx.default_map or {}), **settings}
    return value


# ---------------------------------------------------------------------- the CLI user's file


@dataclass(frozen=True)
class ClientConfig:
    url: str | None = None
    ca: Path | None = None
    token: str | None = None
    source: Path | None = None  # the file it was read from

    @property
    def insecure(self) -> bool:
        return self.url is not None and self.url.startswith("http://")


def read_client_config(path: Path | None) -> ClientConfig:
    """The user's settings from ``path`` (if it exists), then the environment on top."""
    data: dict[str, Any] = {}
    if path is not None and path.is_file():
        data = read_toml(path)
        unknown = set(data) - {"url", "ca", "token"}
        if unknown:
            raise InvalidRequest(f"{path}: unknown settings {sorted(unknown)} (known: url, ca, token)")
    url = os.environ.get("LIVEMIG_URL") or data.get("url")
    ca = os.environ.get("LIVEMIG_CA") or data.get("ca")
    token = os.environ.get("LIVEMIG_TOKEN") or data.get("token")
    return ClientConfig(url=str(url) if url else None, ca=Path(str(ca)) if ca else None,
                        token=str(token) if token else None, source=path if data else None)  # fmt: skip


def write_client_config(path: Path, url: str, ca: Path | None, token: str | None) -> Path:
    """What ``livemig up`` leaves for the local user (0600: it holds an admin token)."""
    values: dict[str, object] = {"url": url, "ca": str(ca) if ca else None, "token": token}
    return write_toml(path, values, mode=0o600, comment="livemig CLI: the LMO, the region CA, your bearer token "
                      "(keep this file private)")  # fmt: skip
