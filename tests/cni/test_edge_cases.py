"""Issue 12, finding 4: CNI edge cases end in a definite CNI error (valid CNI error JSON,
the right code), not "try again later", and leave what works alone."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import uuid

import pytest

from tortie.agent.cni_server import MAX_REQUEST
from tortie.cni import protocol, shim

ARGS = "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME={pod}"


def _cni_error(stdout: str, code: int) -> dict:
    err = json.loads(stdout)  # one valid CNI error document
    assert set(err) >= {"cniVersion", "code", "msg"} and isinstance(err["msg"], str), err
    assert err["code"] == code, err
    return err


def test_shim_and_server_share_the_size_limit():
    assert shim.MAX_REQUEST == MAX_REQUEST


@pytest.mark.parametrize("megabytes", [5, 10])
def test_oversized_network_config_names_the_limit(cni_node, megabytes):
    conf = {**cni_node.config(), "padding": "x" * (megabytes << 20)}
    r = cni_node.exec_plugin("ADD", conf, cid=uuid.uuid4().hex, netns=cni_node.pod_ns(), args=ARGS.format(pod="big"))
    assert r.rc == 1
    err = _cni_error(r.stdout, 7)
    assert "too large" in err["msg"] and str(MAX_REQUEST) in err["msg"], err
    assert cni_node.allocations() == [] and cni_node.veths() == []


def test_server_answers_an_oversized_request_instead_of_closing(cni_node):
    request = protocol.encode_request({"CNI_COMMAND": "ADD"}, b"{" + b" " * (6 << 20) + b"}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(cni_node.socket)
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply[:1] == b"\x01"
    err = _cni_error(reply[1:].decode(), 7)
    assert "too large" in err["msg"] and str(len(request)) in err["msg"], err


def test_second_add_with_another_netns_is_refused_and_the_first_kept(cni_node):
    cid, first_ns, second_ns = uuid.uuid4().hex, cni_node.pod_ns(), cni_node.pod_ns()
    r = cni_node.exec_plugin("ADD", cni_node.config(), cid=cid, netns=first_ns, args=ARGS.format(pod="web"))
    assert r.rc == 0, r.stdout
    ip = r.json["ips"][0]["address"]
    again = cni_node.exec_plugin("ADD", cni_node.config(), cid=cid, netns=second_ns, args=ARGS.format(pod="web"))
    assert again.rc == 1
    assert "another network namespace" in _cni_error(again.stdout, 4)["msg"]
    links = subprocess.run(["ip", "-n", second_ns, "-o", "link"], capture_output=True, text=True).stdout
    assert "eth0" not in links
    addrs = subprocess.run(["ip", "-n", first_ns, "-o", "addr", "show", "dev", "eth0"],
                           capture_output=True, text=True).stdout
    assert ip in addrs
    assert cni_node.allocations() == [ip.split("/")[0]] and len(cni_node.weps()) == 1
    # the same ADD again (same namespace) is still fine: idempotent
    same = cni_node.exec_plugin("ADD", cni_node.config(), cid=cid, netns=first_ns, args=ARGS.format(pod="web"))
    assert same.rc == 0 and same.json["ips"][0]["address"] == ip


def test_caller_not_permitted_to_open_the_socket_gets_a_permanent_error(cni_node):
    """A caller that is not root (EACCES on the socket) gets code 5, not 11 "try again"."""
    if shutil.which("setpriv") is None or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs setpriv and /usr/bin/python3 to run the shim as nobody")
    d = tempfile.mkdtemp(prefix="tortie-shim-")
    try:
        os.chmod(d, 0o755)
        path = os.path.join(d, "tortie")
        shutil.copy(shim.__file__, path)
        os.chmod(path, 0o644)
        env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": uuid.uuid4().hex, "CNI_NETNS": "/run/netns/x",
               "CNI_IFNAME": "eth0", "CNI_PATH": d, "PATH": "/usr/bin:/bin"}
        r = subprocess.run(["ip", "netns", "exec", cni_node.ns, "setpriv", "--reuid=65534", "--regid=65534",
                            "--clear-groups", "/usr/bin/python3", "-I", "-S", path],
                           input=json.dumps(cni_node.config()).encode(), env=env, capture_output=True, timeout=30)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert r.returncode == 1, r.stderr
    err = _cni_error(r.stdout.decode(), 5)
    assert "Permission denied" in err["details"] and "root" in err["msg"], err
