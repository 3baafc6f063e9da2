"""The TCP echo probe's labelled segments, against a real echo server on loopback (fast): the demo
learns each migration's longest gap on one connection that lives across both."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from livemig.testing.netprobe import tcp_echo


def echo_server(stall: threading.Event) -> tuple[int, threading.Thread]:
    """Echoes lines; while ``stall`` is set, holds each echo back for 300 ms (a migration's pause)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                if stall.is_set():
                    time.sleep(0.3)
                    stall.clear()
                conn.sendall(line)
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server.getsockname()[1], thread


def mark(path: Path, label: str) -> None:
    staged = path.with_suffix(".new")
    staged.write_text(label)
    staged.rename(path)
    deadline = time.monotonic() + 5
    while path.exists():
        assert time.monotonic() < deadline, "the probe did not take the mark"
        time.sleep(0.005)


def test_segments_split_one_connection_and_keep_each_stall_where_it_began(tmp_path: Path) -> None:
    stall = threading.Event()
    port, server = echo_server(stall)
    stop, mark_file = tmp_path / "stop", tmp_path / "mark"
    result: dict = {}
    probe = threading.Thread(target=lambda: result.update(tcp_echo("127.0.0.1", port, 2, str(stop), 30,
                                                                    str(mark_file))))  # fmt: skip
    probe.start()
    time.sleep(0.2)
    mark(mark_file, "migration-1")
    stalled_at = time.time()
    stall.set()  # one echo held back 300 ms inside the migration...
    time.sleep(0.5)
    mark(mark_file, "after-migration-1")  # ...and marked after it came back
    time.sleep(0.2)
    stop.touch()
    probe.join(10)
    server.join(10)

    assert result["error"] is None
    segments = {s["label"]: s for s in result["segments"]}
    assert list(segments) == ["start", "migration-1", "after-migration-1"]
    assert segments["migration-1"]["max_gap_ms"] >= 300
    # when it ended, on the wall clock a migration's timeline uses
    assert stalled_at + 0.29 <= segments["migration-1"]["max_gap_end_unix"] < stalled_at + 2
    assert segments["start"]["max_gap_ms"] < 300 and segments["after-migration-1"]["max_gap_ms"] < 300
    assert all(s["sent"] == s["received"] > 0 for s in segments.values())
    assert sum(s["received"] for s in segments.values()) == result["received"] == result["sent"]
    assert result["max_gap_ms"] == segments["migration-1"]["max_gap_ms"]


def test_without_a_mark_file_the_report_is_as_before(tmp_path: Path) -> None:
    port, server = echo_server(threading.Event())
    stop = tmp_path / "stop"
    threading.Timer(0.3, stop.touch).start()
    result = tcp_echo("127.0.0.1", port, 2, str(stop), 30)
    server.join(10)
    assert "segments" not in result and result["error"] is None and result["received"] == result["sent"] > 0


def test_an_unanswered_line_is_counted_in_the_segment_it_was_sent_in(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))

    def one_echo_then_close() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(100))
            conn.recv(100)  # the second line is never answered

    threading.Thread(target=one_echo_then_close, daemon=True).start()
    result = tcp_echo("127.0.0.1", server.getsockname()[1], 2, str(tmp_path / "stop"), 30, str(tmp_path / "mark"))
    server.close()
    assert result["error"] is not None
    assert result["segments"] == [{**result["segments"][0], "label": "start", "sent": 2, "received": 1}]
