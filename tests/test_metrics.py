"""tortie.metrics: the Prometheus text exposition of counters, gauges and histograms."""

import threading

import pytest

from tortie.metrics import Registry


def test_histogram_exposition():
    reg = Registry()
    h = reg.histogram("tortie_apply_seconds", "Time of one apply", buckets=(0.1, 1, 0.5))
    assert reg.histogram("tortie_apply_seconds", "again") is h
    for v in (0.05, 0.1, 0.3, 2.0):  # summed in this order
        h.observe(v, manager="routes")
    h.observe(0.7, manager="rules")
    text = reg.render()
    assert text.endswith("\n")
    assert text.splitlines() == [
        "# HELP tortie_apply_seconds Time of one apply",
        "# TYPE tortie_apply_seconds histogram",
        'tortie_apply_seconds_bucket{manager="routes",le="0.1"} 2',  # le is inclusive
        'tortie_apply_seconds_bucket{manager="routes",le="0.5"} 3',
        'tortie_apply_seconds_bucket{manager="routes",le="1"} 3',
        'tortie_apply_seconds_bucket{manager="routes",le="+Inf"} 4',
        f'tortie_apply_seconds_sum{{manager="routes"}} {0.05 + 0.1 + 0.3 + 2.0!r}',
        'tortie_apply_seconds_count{manager="routes"} 4',
        'tortie_apply_seconds_bucket{manager="rules",le="0.1"} 0',
        'tortie_apply_seconds_bucket{manager="rules",le="0.5"} 0',
        'tortie_apply_seconds_bucket{manager="rules",le="1"} 1',
        'tortie_apply_seconds_bucket{manager="rules",le="+Inf"} 1',
        'tortie_apply_seconds_sum{manager="rules"} 0.7',
        'tortie_apply_seconds_count{manager="rules"} 1',
    ]


def test_histogram_without_labels_and_with_other_metrics():
    reg = Registry()
    reg.counter("tortie_rounds_total", "Rounds").inc()
    reg.histogram("tortie_lat_seconds", "Latency", buckets=(1,)).observe(3)
    assert reg.render().splitlines()[3:] == [
        "# HELP tortie_lat_seconds Latency",
        "# TYPE tortie_lat_seconds histogram",
        'tortie_lat_seconds_bucket{le="1"} 0',
        'tortie_lat_seconds_bucket{le="+Inf"} 1',
        "tortie_lat_seconds_sum 3",
        "tortie_lat_seconds_count 1",
    ]


def test_histogram_buckets_must_be_distinct():
    with pytest.raises(ValueError):
        Registry().histogram("x", "x", buckets=(1, 1))
    with pytest.raises(ValueError):
        Registry().histogram("x", "x", buckets=())


def test_histogram_is_thread_safe():
    reg = Registry()
    h = reg.histogram("tortie_work_seconds", "Work", buckets=(0.5,))
    threads, per = 8, 5000

    def work(i: int) -> None:
        for n in range(per):
            h.observe(n % 2, worker=str(i % 2))

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    while any(t.is_alive() for t in pool):
        reg.render()  # rendering while observing neither fails nor loses observations
    for t in pool:
        t.join()
    lines = reg.render().splitlines()
    for w in ("0", "1"):
        assert f'tortie_work_seconds_count{{worker="{w}"}} {threads // 2 * per}' in lines
        assert f'tortie_work_seconds_bucket{{worker="{w}",le="0.5"}} {threads // 2 * per // 2}' in lines
        assert f'tortie_work_seconds_sum{{worker="{w}"}} {threads // 2 * per // 2}' in lines
