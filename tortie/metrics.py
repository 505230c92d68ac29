"""A small Prometheus registry: counters and gauges with labels, text exposition format.

Hand-written rather than prometheus_client to keep the agent's dependencies to the
named ones; the exposition format is simple and stable.
"""

from __future__ import annotations

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


class Registry:
    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self.started = time.time()

    def counter(self, name: str, help_text: str) -> Metric:
        return self.metrics.setdefault(name, Metric(name, help_text, "counter"))

    def gauge(self, name: str, help_text: str) -> Metric:
        return self.metrics.setdefault(name, Metric(name, help_text, "gauge"))

    def render(self) -> str:
        return "\n".join(m.render() for m in self.metrics.values()) + "\n"
