"""A small Prometheus registry: counters and gauges with labels, text exposition format.

Hand-written rather than prometheus_client to keep the agent's dependencies to the
named ones; the exposition format is simple and stable.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict


class Metric:
    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name, self.help, self.kind = name, help_text, kind
        self.values: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)

    def _key(self, labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(labels.items()))

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[self._key(labels)] += amount

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = value

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for key, value in sorted(self.values.items()):
            lbl = ",".join(f'{k}="{v}"' for k, v in key)
            lines.append(f"{self.name}{{{lbl}}} {value:g}" if lbl else f"{self.name} {value:g}")
        return "\n".join(lines)


class Histogram:
    """Cumulative buckets, sum and count per label set; observed from any thread."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help = name, help_text
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        # label key -> [count per bucket (+Inf last), sum]
        self.series: dict[tuple[tuple[str, str], ...], list] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            s = self.series.get(key)
            if s is None:
                s = self.series[key] = [[0] * (len(self.buckets) + 1), 0.0]
            s[0][i] += 1
            s[1] += value

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((k, list(v[0]), v[1]) for k, v in self.series.items())
        for key, counts, total in items:
            base = ",".join(f'{k}="{v}"' for k, v in key)
            sep = "," if base else ""
            running = 0
            for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
                running += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'{self.name}_bucket{{{base}{sep}le="{le}"}} {running}')
            lbl = f"{{{base}}}" if base else ""
            lines.append(f"{self.name}_sum{lbl} {total:g}")
            lines.append(f"{self.name}_count{lbl} {running}")
        return "\n".join(lines)


class Registry:
    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self.started = time.time()

    def counter(self, name: str, help_text: str) -> Metric:
        return self.metrics.setdefault(name, Metric(name, help_text, "counter"))

    def gauge(self, name: str, help_text: str) -> Metric:
        return self.metrics.setdefault(name, Metric(name, help_text, "gauge"))

    def histogram(self, name: str, help_text: str, buckets: tuple[float, ...]) -> Histogram:
        return self.metrics.setdefault(name, Histogram(name, help_text, buckets))

    def render(self) -> str:
        return "\n".join(m.render() for m in self.metrics.values()) + "\n"
