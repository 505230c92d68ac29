"""A small Prometheus registry: counters, gauges and histograms with labels, in the text
exposition format.

Hand-written rather than prometheus_client to keep the agent's dependencies to the
named ones; the exposition format is simple and stable.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

LabelKey = tuple[tuple[str, str], ...]
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _label_text(key: LabelKey) -> str:
    return ",".join(f'{k}="{v}"' for k, v in key)


def _number(v: float) -> str:
    """Exact, unlike `:g` (which keeps six digits): 3, 0.005, 1234567, 2.4500000000000002."""
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if float(v).is_integer() and abs(v) < 2 ** 53 else repr(float(v))


class Metric:
    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name, self.help, self.kind = name, help_text, kind
        self.values: dict[LabelKey, float] = defaultdict(float)

    def _key(self, labels: dict[str, str]) -> LabelKey:
        return tuple(sorted(labels.items()))

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[self._key(labels)] += amount

    def set(self, value: float, **labels: str) -> None:
        self.values[self._key(labels)] = value

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for key, value in sorted(self.values.items()):
            lbl = _label_text(key)
            lines.append(f"{self.name}{{{lbl}}} {value:g}" if lbl else f"{self.name} {value:g}")
        return "\n".join(lines)


class Histogram:
    """Observations counted into cumulative buckets (`le`), with their sum and count.

    Thread-safe: `observe` may be called from any thread while another renders.
    """

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float] = DEFAULT_BUCKETS) -> None:
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"histogram {name}: buckets must be distinct numbers, at least one")
        self.name, self.help = name, help_text
        self.bounds = (*bounds, math.inf)
        self._lock = threading.Lock()
        # labels -> (observations per bucket, not yet cumulative; sum; count)
        self._series: dict[LabelKey, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        slot = bisect.bisect_left(self.bounds, value)  # the first bound >= value: le is inclusive
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * len(self.bounds), [0.0]))
            counts[slot] += 1
            total[0] += value

    def render(self) -> str:
        with self._lock:
            series = sorted((key, list(counts), total[0]) for key, (counts, total) in self._series.items())
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, counts, total in series:
            lbl = _label_text(key)
            running = 0
            for bound, n in zip(self.bounds, counts, strict=True):
                running += n
                lines.append(f'{self.name}_bucket{{{lbl + "," if lbl else ""}le="{_number(bound)}"}} {running}')
            braces = f"{{{lbl}}}" if lbl else ""
            lines.append(f"{self.name}_sum{braces} {_number(total)}")
            lines.append(f"{self.name}_count{braces} {running}")
        return "\n".join(lines)


class Registry:
    def __init__(self) -> None:
        self.metrics: dict[str, Metric | Histogram] = {}
        self.started = time.time()
        # set gauges at render time, from their source: a scrape reads them, no timer does
        self.collectors: list[Callable[[], None]] = []

    def counter(self, name: str, help_text: str) -> Metric:
        return self.metrics.setdefault(name, Metric(name, help_text, "counter"))

    def gauge(self, name: str, help_text: str) -> Metric:
        return self.metrics.setdefault(name, Metric(name, help_text, "gauge"))

    def histogram(self, name: str, help_text: str, buckets: Iterable[float] = DEFAULT_BUCKETS) -> Histogram:
        return self.metrics.setdefault(name, Histogram(name, help_text, buckets))

    def render(self) -> str:
        for collect in self.collectors:
            collect()
        return "\n".join(m.render() for m in list(self.metrics.values())) + "\n"
