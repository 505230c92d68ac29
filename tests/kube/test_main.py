"""The tortie-controller executable: configured from the environment, stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from doubles.apiserver_fake import namespace
from kubehelpers import wait_for

from tortie.datastore.store import ResourceStore
from tortie.errors import NotFound


def test_runs_from_env_and_exits_cleanly_on_sigterm(etcd, etcd_config, fake_api):
    exe = os.path.join(os.path.dirname(sys.executable), "tortie-controller")
    fake_api.add(namespace("from-cli"))
    env = {**os.environ, "TORTIE_K8S_API": fake_api.url, "TORTIE_ETCD_ENDPOINTS": etcd_config.endpoints[0],
           "TORTIE_ETCD_PREFIX": etcd_config.prefix, "TORTIE_LOG_FORMAT": "json"}
    proc = subprocess.Popen([exe], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        store = ResourceStore(etcd)

        def mirrored():
            try:
                return store.get("Namespace", "from-cli")
            except NotFound:
                return None

        wait_for(mirrored, timeout=20, what="namespace mirrored by the executable")
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert time.monotonic() - start < 10
        events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert any(e["event"] == "in sync" and e["component"] == "controller" for e in events)
        assert events[-1]["event"] == "controller stopped"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
