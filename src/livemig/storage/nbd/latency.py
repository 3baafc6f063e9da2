"""How long the NBD server takes to answer each kind of request: a histogram kept in plain lists.

Why not a ``prometheus_client.Histogram``: its ``observe`` takes a lock and walks the bucket
bounds in Python for every request, on the path every small guest I/O takes (``bench/blockd.py``
measures it). Here a request costs an index and two additions, and a batch of inline requests
(answered together, in one ``send``) finds its bucket once. :meth:`RequestLatency.families` turns the lists
into Prometheus histograms when ``/metrics`` is scraped.

What is measured: from the moment the request's bytes arrived (the ``data_received`` that completed
it) to the moment its reply was handed to the transport. Requests answered inline (small reads
and writes from the page cache) share their batch's time; the others (FUA writes, flushes, large
I/O, a write waiting for a fencing takeover) are measured one by one.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client.core import HistogramMetricFamily

from livemig.storage.nbd import protocol as p

#: upper bounds, seconds: inline page-cache I/O takes microseconds, an fdatasync milliseconds, a
#: write behind a takeover waits for the older writer's requests in flight
BOUNDS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
          0.1, 0.25, 0.5, 1.0, 2.5, 10.0)  # fmt: skip
#: the commands reported (each at 0 until it is seen), by their name in the ``op`` label
REPORTED = {int(c): c.name.lower() for c in
            (p.Command.READ, p.Command.WRITE, p.Command.FLUSH, p.Command.TRIM, p.Command.WRITE_ZEROES)}  # fmt: skip
_SLOTS = max(int(c) for c in p.Command) + 1


class RequestLatency:
    """Per NBD command: how many requests fell in each bucket (not cumulative), and their total seconds."""

    __slots__ = ("buckets", "sums")

    def __init__(self) -> None:
        self.buckets = [[0] * (len(BOUNDS) + 1) for _ in range(_SLOTS)]
        self.sums = [0.0] * _SLOTS

    def observe(self, command: int, seconds: float) -> None:
        self.buckets[command][bisect_left(BOUNDS, seconds)] += 1
        self.sums[command] += seconds

    def observe_batch(self, commands: Iterable[int], seconds: float) -> None:
        """Requests answered together, each in ``seconds``."""
        index = bisect_left(BOUNDS, seconds)
        buckets, sums = self.buckets, self.sums
        for command in commands:
            buckets[command][index] += 1
            sums[command] += seconds

    def count(self, command: int) -> int:
        return sum(self.buckets[command])

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The Prometheus histogram, one series per reported command (label ``op``)."""
        family = HistogramMetricFamily(name, documentation, labels=["op"])
        for command, op in REPORTED.items():
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, n in zip((*BOUNDS, float("inf")), self.buckets[command], strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric([op], buckets, self.sums[command])
        return family
