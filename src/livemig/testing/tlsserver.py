"""A real uvicorn server in a background thread, for tests and benchmarks of (mutual) TLS.

Why a thread and not a subprocess: the tests count handler calls and rotate the server's
certificate on disk while it runs; both are plain Python objects shared with the test. The server
is still a real uvicorn on a real TCP socket, reached by real clients (httpx, curl, openssl).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from livemig.region.freeport import free_port


class ThreadedUvicorn:
    """``uvicorn.Server`` for ``app`` on 127.0.0.1, started and stopped from the calling thread."""

    def __init__(self, app: Any, **config: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", **config)
        )
        self._thread = threading.Thread(target=self.server.run, name=f"uvicorn:{self.port}", daemon=True)

    def start(self, timeout: float = 10.0) -> ThreadedUvicorn:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)

    def __enter__(self) -> ThreadedUvicorn:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
