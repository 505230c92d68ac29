"""Bad input: CNI error JSON on stdout, a non-zero exit, and nothing left behind."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

K8S_ARGS = "K8S_POD_NAMESPACE=ns1;K8S_POD_NAME=web"


def _assert_clean(node, pod_ns=None):
    assert node.veths() == []
    assert node.allocations() == []
    assert node.weps() == []
    assert node.host_routes() == ""
    if pod_ns:
        links = subprocess.run(["ip", "-n", pod_ns, "-o", "link"], capture_output=True, text=True).stdout
        assert "eth0" not in links


def _error(call, code):
    assert call.rc != 0
    err = json.loads(call.stdout)  # exactly one JSON document on stdout
    assert set(err) >= {"cniVersion", "code", "msg"}
    assert err["code"] == code, err
    assert isinstance(err["msg"], str) and err["msg"]
    return err


@pytest.mark.parametrize("garbage", [b"", b"not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"cniVersion": '])
def test_garbage_stdin(cni_node, garbage):
    pod_ns = cni_node.pod_ns()
    r = cni_node.exec_plugin("ADD", garbage, cid=uuid.uuid4().hex, netns=pod_ns, args=K8S_ARGS)
    _error(r, 6)
    _assert_clean(cni_node, pod_ns)


@pytest.mark.parametrize("missing", ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"])
def test_missing_cni_variables(cni_node, missing):
    pod_ns = cni_node.pod_ns()
    r = cni_node.exec_plugin("ADD", cni_node.config(), cid=uuid.uuid4().hex, netns=pod_ns, args=K8S_ARGS,
                             omit=(missing,))
    err = _error(r, 4)
    assert missing in err["msg"]
    _assert_clean(cni_node, pod_ns)


@pytest.mark.parametrize(("env", "code"), [
    ({"CNI_COMMAND": "FROB"}, 4),
    ({"CNI_CONTAINERID": "-bad id"}, 4),
    ({"CNI_IFNAME": "a/b"}, 4),
    ({"CNI_IFNAME": "x" * 16}, 4),
    ({"CNI_ARGS": "K8S_POD_NAME=web;SURPRISE=1"}, 4),
    ({"CNI_ARGS": "garbage"}, 4),
    ({"CNI_NETNS": "/run/netns/does-not-exist-" + uuid.uuid4().hex[:6]}, 4),
    ({"CNI_NETNS": "/dev/null"}, 4),
    ({"CNI_NETNS": "/proc/self/ns/uts"}, 4),
])
def test_invalid_environment(cni_node, env, code):
    pod_ns = cni_node.pod_ns()
    r = cni_node.exec_plugin("ADD", cni_node.config(), cid=uuid.uuid4().hex, netns=pod_ns, args=K8S_ARGS, env=env)
    _error(r, code)
    _assert_clean(cni_node, pod_ns)


@pytest.mark.parametrize("version", ["0.1.0", "9.9.9", "", None, 1])
def test_unknown_cni_version(cni_node, version):
    pod_ns = cni_node.pod_ns()
    conf = cni_node.config()
    conf["cniVersion"] = version
    r = cni_node.exec_plugin("ADD", conf, cid=uuid.uuid4().hex, netns=pod_ns, args=K8S_ARGS)
    err = _error(r, 1)
    assert err["cniVersion"] == "1.1.0"  # reported in a version we speak
    _assert_clean(cni_node, pod_ns)


def test_invalid_network_config(cni_node):
    pod_ns = cni_node.pod_ns()
    conf = cni_node.config()
    del conf["name"]
    r = cni_node.exec_plugin("ADD", conf, cid=uuid.uuid4().hex, netns=pod_ns, args=K8S_ARGS)
    _error(r, 7)
    conf = cni_node.config(ipam={"assign_ipv4": "false"})
    r = cni_node.exec_plugin("ADD", conf, cid=uuid.uuid4().hex, netns=pod_ns, args=K8S_ARGS)
    _error(r, 7)
    _assert_clean(cni_node, pod_ns)


def test_agent_not_running(cni_node):
    pod_ns = cni_node.pod_ns()
    cni_node.stop_server()
    for command in ("ADD", "DEL", "CHECK"):
        r = cni_node.exec_plugin(command, cni_node.config("0.4.0"), cid=uuid.uuid4().hex, netns=pod_ns,
                                 args=K8S_ARGS)
        err = _error(r, 11)
        assert err["cniVersion"] == "0.4.0"
        assert "try again later" in err["msg"]
    r = cni_node.exec_plugin("STATUS", cni_node.config("1.1.0"))
    _error(r, 50)
    # VERSION is answered by the shim itself
    v = cni_node.exec_plugin("VERSION", cni_node.config("1.0.0"))
    assert v.rc == 0 and json.loads(v.stdout)["cniVersion"] == "1.0.0"
    _assert_clean(cni_node, pod_ns)


def test_failure_after_ipam_rolls_back(cni_node):
    """The pod already has an eth0 (the veth peer cannot be created): the address taken
    from IPAM is released and no interface or endpoint is left."""
    pod_ns = cni_node.pod_ns()
    subprocess.run(["ip", "-n", pod_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "other"], check=True)
    r = cni_node.exec_plugin("ADD", cni_node.config(), cid=uuid.uuid4().hex, netns=pod_ns, args=K8S_ARGS)
    assert r.rc != 0
    assert json.loads(r.stdout)["code"] == 4  # the name is taken in the pod namespace: definite, named
    assert cni_node.veths() == []
    assert cni_node.allocations() == []
    assert cni_node.weps() == []
    assert cni_node.host_routes() == ""


def test_server_survives_bad_frames(cni_node):
    """Raw garbage on the agent socket is answered with a CNI error, and the server lives on."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(cni_node.socket)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    s.shutdown(socket.SHUT_WR)
    reply = s.recv(65536)
    s.close()
    assert reply[0] == 1 and json.loads(reply[1:])["code"] == 6
    pod_ns = cni_node.pod_ns()
    cid = uuid.uuid4().hex
    assert cni_node.exec_plugin("ADD", cni_node.config(), cid=cid, netns=pod_ns, args=K8S_ARGS).rc == 0
    assert cni_node.exec_plugin("DEL", cni_node.config(), cid=cid, netns=pod_ns, args=K8S_ARGS).rc == 0


def test_socket_mode(cni_node):
    import os
    import stat

    st = os.stat(cni_node.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
