"""The cyclic garbage collector, tuned for services that hold a large, long-lived heap.

Why: CPython's full collection walks every tracked object while it holds the interpreter, so its
pause grows with the heap. An LMO driving a thousand migrations paused every 10-20 s for 75-155 ms,
and the fleet simulator (thousands of hosts, tens of thousands of VMs) for up to half a second,
stalling every request in flight: most of the LMO's p99 API latency under load (a ``gc.callbacks``
probe during ``bench/fleet.py``, docs/fleet.md). Two changes:

- What exists once the service has started (modules, the app, caches) is moved out of the
  collector's sight (``gc.freeze``): it lives as long as the process, and a full collection no
  longer walks it.
- Young collections run every ``YOUNG_THRESHOLD`` allocations instead of every 700. Most of a
  request's or a step's objects die by reference counting before a collection sees them, so far
  fewer survive into the old generation, and the full collections (due when the old generation
  grew by a quarter) come far less often. A young collection stays short: it walks at most the
  objects allocated since the last one.

Cyclic garbage is still collected, later; memory that reference counting frees is unaffected.
"""

from __future__ import annotations

import gc

#: allocations between young collections (CPython's default: 700)
YOUNG_THRESHOLD = 20_000


def tune_for_service() -> None:
    """Call once a long-running service has built its app, before it serves."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
