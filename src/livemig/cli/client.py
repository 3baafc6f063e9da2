"""The CLI user's LMO client: its URL, CA and token from ``--url``, the environment and the config file.

A module of its own (not ``cli/main.py``): ``python -m livemig.cli.main`` runs that file as
``__main__``, so a subcommand importing ``livemig.cli.main`` would see a second copy of it, without
the ``--config`` the top-level option set.
"""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from livemig.cli.config import CLIENT_FILE, read_client_config
from livemig.region.local import Region, default_state_dir
from livemig.wire.base import Credentials, configure
from livemig.wire.lmo import LmoClient

err = Console(stderr=True)
#: the CLI user's config file (``livemig --config FILE ...`` or $LIVEMIG_CONFIG); default: the region's
_config_file: Path | None = None
_warned_insecure = False


def use_config_file(path: Path | None) -> None:
    global _config_file
    _config_file = path


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def warn_insecure(what: str) -> None:
    """Every command against an --insecure region says so (once)."""
    global _warned_insecure
    if not _warned_insecure:
        err.print(f"[bold yellow]warning:[/] {what}: plain HTTP, no TLS, no authentication (an --insecure region)")
        _warned_insecure = True


def lmo(url: str | None, state_dir: Path | None = None) -> LmoClient:
    """The LMO client: URL, CA and token from ``--url``, the environment and the user's config file."""
    config = read_client_config(_config_file or (state_dir or default_state_dir()) / CLIENT_FILE)
    url = url or config.url
    if url is None:
        running = Region(state_dir).running()
        if running is None:
            fail("no local region is running: start one with `livemig up` (or pass --url)")
        url = running.lmo_url
    if url.startswith("http://"):
        warn_insecure(f"the LMO at {url}")
    elif config.token is None:
        err.print("[yellow]note:[/] no bearer token (set $LIVEMIG_TOKEN or `token` in the config file); "
                  "the LMO will answer 401")  # fmt: skip
    creds = Credentials(ca=config.ca, token=config.token)
    configure(creds)
    return LmoClient(url, credentials=creds)
