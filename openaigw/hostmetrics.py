"""/metrics for a host with several workers: every worker's metrics, summed.

prometheus_client's multiprocess mode (metric files in a shared directory) does not fit:
our request metrics are plain dicts behind a collector (openaigw/metrics.py), which
that mode cannot see.  Instead each worker sends a snapshot of its registry when the
supervisor's /metrics is scraped (``snapshot``: families as JSON), and
:class:`HostMetrics` adds them up.  Per-process families (``process_*``, ``python_*``:
CPU, memory, file descriptors, GC) are not summed but kept apart by a ``worker`` label.
The counters of a worker that died are kept, so that a host's counters never go down
when a worker is replaced (what it counted since the last scrape is lost).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Tuple

from prometheus_client.core import Metric

Family = Dict[str, Any]  # name, type, help, unit, samples: [[name, labels, value], ...]
_Labels = Tuple[Tuple[str, str], ...]
_PER_PROCESS = ("process_", "python_")
_CUMULATIVE = ("counter", "histogram", "summary")


def snapshot(registry: Any) -> List[Family]:
    """The families of ``registry``, as JSON-able dicts."""
    return [
        {
            "name": family.name, "type": family.type, "help": family.documentation,
            "unit": family.unit,
            "samples": [[s.name, s.labels, s.value] for s in family.samples if not s.name.endswith("_created")],
        }
        for family in registry.collect()
    ]


def _per_process(family: Family) -> bool:
    return bool(family["name"].startswith(_PER_PROCESS))


class _Collected:
    """What ``generate_latest`` renders: a fixed list of families."""

    def __init__(self, families: List[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class HostMetrics:
    """Sums snapshots into the host's families."""

    def __init__(self) -> None:
        self._retired: Dict[str, Tuple[Family, Dict[Tuple[str, _Labels], float]]] = {}

    def retire(self, families: List[Family]) -> None:
        """Keep the counts of a worker that exited (its last snapshot)."""
        for family in families:
            if _per_process(family) or family["type"] not in _CUMULATIVE:
                continue
            _, samples = self._retired.setdefault(family["name"], (family, {}))
            for name, labels, value in family["samples"]:
                key = (name, tuple(sorted(labels.items())))
                samples[key] = samples.get(key, 0.0) + value

    def merge(self, snapshots: Mapping[str, List[Family]]) -> _Collected:
        """The host's families from each worker's snapshot (keyed by its ``worker`` label)."""
        merged: Dict[str, Tuple[Family, Dict[Tuple[str, _Labels], float]]] = {
            name: (family, dict(samples)) for name, (family, samples) in self._retired.items()
        }
        for worker, families in snapshots.items():
            for family in families:
                _, samples = merged.setdefault(family["name"], (family, {}))
                per_process = _per_process(family)
                for name, labels, value in family["samples"]:
                    if per_process:
                        labels = {**labels, "worker": worker}
                    key = (name, tuple(sorted(labels.items())))
                    samples[key] = value + (0.0 if per_process else samples.get(key, 0.0))
        families = []
        for family, samples in merged.values():
            metric = Metric(family["name"], family["help"], family["type"], family["unit"])
            for (name, labels), value in samples.items():
                metric.add_sample(name, dict(labels), value)
            families.append(metric)
        return _Collected(families)
