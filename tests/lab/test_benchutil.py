"""lab.benchutil: the Prometheus text the benches read from the agent, and the percentiles."""

import math
import os

import pytest

from tortie.lab.benchutil import (
    AgentCPU,
    delta,
    has_metrics,
    histogram_quantile,
    metric_sum,
    parse_metrics,
    pct,
)

BEFORE = """\
# HELP tortie_event_loop_lag_seconds Event-loop lag
# TYPE tortie_event_loop_lag_seconds histogram
tortie_event_loop_lag_seconds_bucket{le="0.001"} 90
tortie_event_loop_lag_seconds_bucket{le="0.01"} 100
tortie_event_loop_lag_seconds_bucket{le="0.1"} 100
tortie_event_loop_lag_seconds_bucket{le="+Inf"} 100
tortie_event_loop_lag_seconds_sum 0.05
tortie_event_loop_lag_seconds_count 100
tortie_calc_cpu_seconds_total 1.5
tortie_dataplane_apply_seconds_sum{manager="routes"} 0.25
tortie_dataplane_apply_seconds_sum{manager="filter"} 0.5
"""

AFTER = """\
tortie_event_loop_lag_seconds_bucket{le="0.001"} 140
tortie_event_loop_lag_seconds_bucket{le="0.01"} 190
tortie_event_loop_lag_seconds_bucket{le="0.1"} 199
tortie_event_loop_lag_seconds_bucket{le="+Inf"} 200
tortie_event_loop_lag_seconds_sum 0.9
tortie_event_loop_lag_seconds_count 200
tortie_calc_cpu_seconds_total 1.504
tortie_dataplane_apply_seconds_sum{manager="routes"} 0.375
tortie_dataplane_apply_seconds_sum{manager="filter"} 0.5
"""


def test_counter_and_labelled_sums():
    b, a = parse_metrics(BEFORE), parse_metrics(AFTER)
    assert delta(a, b, "tortie_calc_cpu_seconds_total") == pytest.approx(0.004)
    assert delta(a, b, "tortie_dataplane_apply_seconds_sum") == pytest.approx(0.125)
    assert metric_sum(a, "tortie_dataplane_apply_seconds_sum", manager="filter") == 0.5
    assert delta(a, b, "tortie_missing") is None
    assert has_metrics(a, "tortie_event_loop_lag_seconds", "tortie_calc_cpu_seconds_total")
    assert not has_metrics(a, "tortie_missing")


def test_histogram_quantile_of_the_window():
    b, a = parse_metrics(BEFORE), parse_metrics(AFTER)
    # in the window: 50 <= 1 ms, 40 in (1, 10] ms, 9 in (10, 100] ms, 1 above
    assert histogram_quantile(a, "tortie_event_loop_lag_seconds", 0.5, before=b) == pytest.approx(0.001)
    p90 = histogram_quantile(a, "tortie_event_loop_lag_seconds", 0.9, before=b)
    assert p90 == pytest.approx(0.01)
    p99 = histogram_quantile(a, "tortie_event_loop_lag_seconds", 0.99, before=b)
    assert 0.01 < p99 <= 0.1
    assert histogram_quantile(a, "tortie_event_loop_lag_seconds", 0.999, before=b) == 0.1  # in +Inf: its floor
    assert histogram_quantile(a, "tortie_event_loop_lag_seconds", 0.99, before=a) is None  # nothing observed
    assert histogram_quantile(a, "tortie_missing", 0.99) is None
    assert not math.isnan(p99)


def test_pct_nearest_rank():
    values = [float(i) for i in range(1, 101)]
    assert pct(values, 50) == 50.0
    assert pct(values, 99) == 99.0
    assert pct([3.0], 99) == 3.0


def test_agent_cpu_counts_this_process():
    cpu = AgentCPU(os.getpid())
    t0 = cpu.seconds()
    sum(i * i for i in range(300_000))
    assert cpu.seconds() > t0
    assert cpu.ticks_seconds() >= 0


def test_udp_stream_gap_is_the_longest_silence_between_replies():
    from tortie.lab.benchutil import UDPStream

    s = UDPStream.__new__(UDPStream)  # no socket: only the arithmetic
    s.replies = [1.0, 1.01, 1.02, 1.5, 1.51, 3.0]
    assert s.longest_gap(0.995, 1.6) == pytest.approx(0.48)
    assert s.longest_gap(1.505, 2.0) == pytest.approx(0.49)  # none after 1.51: the end counts
    assert s.longest_gap(2.0, 2.5) == pytest.approx(0.5)  # no reply at all
