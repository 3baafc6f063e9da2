"""Run blockd: the NBD server and the admin API (uvicorn) in one asyncio event loop.

Why one loop: attachments, fencing state and I/O counters are plain Python objects touched by
both the NBD connections and the API; a single loop makes every decision (e.g. "this write takes
over the volume") atomic without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from livemig.errors import InvalidRequest
from livemig.security.pki import LeafFiles, Role
from livemig.security.tls import ReloadingServerContext, roles_allowed, uvicorn_tls
from livemig.storage.api import create_app
from livemig.storage.blockd import Blockd
from livemig.storage.nbd.server import NbdServer, NbdTls
from livemig.wire.base import SERVER_KEEPALIVE_S

log = logging.getLogger(__name__)

DEFAULT_API_LISTEN = "127.0.0.1:7410"
DEFAULT_NBD_LISTEN = "127.0.0.1:10809"
#: Who may open an export over TLS: a host's QEMU (guest disks), its hostd (tools on the host:
#: a UEFI store, a cloud-init seed) and the LMO's certificate (volume transfers: ``livemig volume
#: import|export`` on the machine holding it; a transfer is an attachment the LMO made for it).
NBD_CLIENT_ROLES = (Role.QEMU, Role.HOSTD, Role.LMO)


def nbd_tls(leaf: LeafFiles) -> NbdTls:
    """Forced TLS for the NBD server with blockd's leaf; reloaded when the leaf is rotated."""
    return NbdTls(ReloadingServerContext(leaf).context, authorize=roles_allowed(*NBD_CLIENT_ROLES))


def parse_listen(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``:port`` or ``port`` -> (host, port)."""
    text = value.strip()
    host, port_text = default_host, text
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        host = host or default_host
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidRequest(f"bad listen address {value!r}: expected host:port") from None
    if not 0 <= port <= 65535:
        raise InvalidRequest(f"bad listen address {value!r}: port out of range")
    return host, port


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal handling: it re-raises SIGTERM after serving, which would kill
    the process before the NBD server is closed. :func:`serve_blockd` owns the signals instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_blockd(
    data_dir: Path,
    api_listen: str = DEFAULT_API_LISTEN,
    nbd_listen: str = DEFAULT_NBD_LISTEN,
    *,
    fencing: bool | None = None,
    tls: LeafFiles | None = None,
) -> None:
    """Serve until cancelled or until uvicorn receives SIGINT/SIGTERM.

    ``tls``: blockd's leaf; NBD is then forced-TLS and the admin API mutual TLS with roles. Without
    it both are plain and open to anyone who reaches them (a lab's ``--insecure``)."""
    api_host, api_port = parse_listen(api_listen)
    nbd_host, nbd_port = parse_listen(nbd_listen)
    blockd = Blockd(data_dir, fencing=fencing)
    server = NbdServer(blockd, tls=nbd_tls(tls) if tls is not None else None)
    bound_host, bound_port = await server.start(nbd_host, nbd_port)
    blockd.bind_server(server, bound_host, bound_port)
    api_tls = uvicorn_tls(ReloadingServerContext(tls)) if tls is not None else {}
    config = uvicorn.Config(
        create_app(blockd, insecure=tls is None), host=api_host, port=api_port, log_level="warning",
        log_config=None, access_log=False, lifespan="off", timeout_keep_alive=SERVER_KEEPALIVE_S, **api_tls,
    )  # fmt: skip
    api = _ApiServer(config)
    log.info(
        "blockd: data %s, API %s://%s:%d, NBD %s:%d (%s), fencing %s",
        data_dir, "https" if tls else "http", api_host, api_port, bound_host, bound_port,
        "TLS required" if tls else "plain, INSECURE",
        "on" if blockd.fences.enabled else "OFF",
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(api.serve())
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("blockd: signal received, shutting down")
        api.should_exit = True
        await serving
    finally:
        stopping.cancel()
        if not serving.done():
            api.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(serving, 10)
        await server.close()
        log.info("blockd stopped")


def run_blockd(
    data_dir: Path,
    api_listen: str = DEFAULT_API_LISTEN,
    nbd_listen: str = DEFAULT_NBD_LISTEN,
    *,
    tls: LeafFiles | None = None,
) -> None:
    """Blocking entry point for ``livemig blockd``."""
    asyncio.run(serve_blockd(data_dir, api_listen, nbd_listen, tls=tls))
