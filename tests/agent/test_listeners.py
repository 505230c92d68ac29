"""Issue 12, finding 5: the agent's health listener is on loopback by default (as
Felix's), metrics where configured; both addresses are settings."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tortie.agent import config
from tortie.errors import ValidationError
from tortie.lab import nsutil

OTHER_ADDR = "10.123.0.1"  # an address of the namespace that is not loopback

SERVE = textwrap.dedent("""
    import asyncio, sys
    from tortie.agent import config
    from tortie.health import Health, start_http
    from tortie.metrics import Registry

    async def main():
        cfg = config.load()
        await start_http(Health(), Registry(), cfg.health_host, cfg.health_port, cfg.metrics_host,
                         cfg.metrics_port)
        print("up", flush=True)
        await asyncio.sleep(30)

    asyncio.run(main())
""")


def test_settings_and_their_defaults():
    base = {"TORTIE_NODENAME": "n1", "TORTIE_BGP_ENABLED": "false"}
    cfg = config.load(base)
    assert (cfg.health_host, cfg.health_port, cfg.metrics_host, cfg.metrics_port) == \
        ("127.0.0.1", 9099, "0.0.0.0", 9091)
    cfg = config.load({**base, "TORTIE_HEALTH_HOST": "::1", "TORTIE_METRICS_HOST": "127.0.0.1"})
    assert (cfg.health_host, cfg.metrics_host) == ("::1", "127.0.0.1")
    with pytest.raises(ValidationError, match="TORTIE_METRICS_HOST"):
        config.load({**base, "TORTIE_METRICS_HOST": "everywhere"})


def _serve(netns, ns: str, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVE],
                            env={"TORTIE_NODENAME": "n1", "TORTIE_BGP_ENABLED": "false", "PATH": "/usr/bin:/bin",
                                 **env},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


def test_health_answers_on_loopback_only_by_default(netns):
    ns = netns.new("listen")
    netns.run(ns, "ip", "addr", "add", f"{OTHER_ADDR}/32", "dev", "lo")
    proc = _serve(netns, ns)
    try:
        assert nsutil.http_get(ns, "127.0.0.1", 9099, "/liveness")[0] in (200, 503)
        assert nsutil.http_get(ns, OTHER_ADDR, 9099, "/liveness")[0] == 0
        assert nsutil.http_get(ns, OTHER_ADDR, 9091, "/metrics")[0] == 200
    finally:
        _stop(proc)
    proc = _serve(netns, ns, TORTIE_HEALTH_HOST=OTHER_ADDR, TORTIE_METRICS_HOST="127.0.0.1")
    try:
        assert nsutil.http_get(ns, OTHER_ADDR, 9099, "/liveness")[0] in (200, 503)
        assert nsutil.http_get(ns, OTHER_ADDR, 9091, "/metrics")[0] == 0
        assert nsutil.http_get(ns, "127.0.0.1", 9091, "/metrics")[0] == 200
    finally:
        _stop(proc)
