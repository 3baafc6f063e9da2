"""Prometheus view of blockd, computed at scrape time.

Why a collector instead of Counter objects: the NBD hot path bumps plain integers on the
attachment (nanoseconds); labelled prometheus counters would cost a dict lookup and a lock per
request. The collector reads those integers when ``/metrics`` is scraped.

The series an operator watches during migrations: ``livemig_blockd_fenced_writes_total`` (writes
refused because a newer attachment owns the volume: a source that wrote after the cut-over; it
survives the attachment's detach, unlike the per-attachment ``livemig_blockd_rejected_writes_total``)
and ``livemig_blockd_nbd_request_duration_seconds{op}`` (arrival to reply, ``nbd/latency.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from livemig.storage.nbd.latency import RequestLatency

if TYPE_CHECKING:
    from livemig.storage.blockd import Blockd


class BlockdCollector(Collector):
    def __init__(self, blockd: Blockd) -> None:
        self.blockd = blockd

    def collect(self) -> Iterator[Metric]:
        blockd = self.blockd
        labels = ["volume", "attachment", "vm", "host"]
        ops = CounterMetricFamily(
            "livemig_blockd_requests", "NBD requests executed, by attachment and kind", labels=[*labels, "op"]
        )
        rejected = CounterMetricFamily(
            "livemig_blockd_rejected_writes",
            "Write-class requests rejected by fencing (stale attachment)",
            labels=labels,
        )
        nbytes = CounterMetricFamily(
            "livemig_blockd_bytes", "Bytes read/written through NBD", labels=[*labels, "direction"]
        )
        writer = GaugeMetricFamily(
            "livemig_blockd_attachment_is_writer", "1 if the attachment is its volume's writer", labels=labels
        )
        fenced = GaugeMetricFamily("livemig_blockd_attachment_fenced", "1 if the attachment is fenced", labels=labels)
        for a in blockd.fences.all():
            if a.detached:
                continue
            values = [a.volume, a.id, a.vm, a.host]
            c = a.counters
            ops.add_metric([*values, "read"], c.reads)
            ops.add_metric([*values, "write"], c.writes)
            ops.add_metric([*values, "flush"], c.flushes)
            rejected.add_metric(values, c.rejected_writes)
            nbytes.add_metric([*values, "read"], c.bytes_read)
            nbytes.add_metric([*values, "write"], c.bytes_written)
            writer.add_metric(values, 1 if blockd.fences.is_writer(a) else 0)
            fenced.add_metric(values, 1 if a.fenced else 0)
        volumes = GaugeMetricFamily("livemig_blockd_volumes", "Volumes defined")
        volumes.add_metric([], len(blockd.volumes.list()))
        size = GaugeMetricFamily("livemig_blockd_volume_size_bytes", "Volume size", labels=["volume"])
        for v in blockd.volumes.list():
            size.add_metric([v.name], v.size_bytes)
        connections = GaugeMetricFamily("livemig_blockd_nbd_connections", "Open NBD connections")
        protocol_errors = CounterMetricFamily(
            "livemig_blockd_nbd_protocol_errors", "NBD connections dropped for breaking the protocol"
        )
        server = blockd.server
        connections.add_metric([], server.connection_count if server else 0)
        protocol_errors.add_metric([], server.protocol_errors if server else 0)
        fencing = GaugeMetricFamily("livemig_blockd_fencing_enabled", "0 only with the test-only unsafe switch")
        fencing.add_metric([], 1 if blockd.fences.enabled else 0)
        fenced_writes = CounterMetricFamily(
            "livemig_blockd_fenced_writes", "Write-class requests refused by fencing since blockd started"
        )
        fenced_writes.add_metric([], blockd.fences.rejected_writes)
        yield from (ops, rejected, nbytes, writer, fenced, volumes, size, connections, protocol_errors, fencing,
                    fenced_writes)  # fmt: skip
        latency = RequestLatency() if server is None else server.latency
        yield latency.family("livemig_blockd_nbd_request_duration_seconds",
                             "NBD requests from arrival to reply, by command")  # fmt: skip
