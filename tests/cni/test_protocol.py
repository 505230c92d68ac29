"""Pure tests of the CNI protocol module and the shim's hand-made JSON and byte search."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tortie import errors
from tortie.cni import protocol as p
from tortie.cni import shim
from tortie.cni.install import install, real_interpreter

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "abc", "CNI_NETNS": "/run/netns/x", "CNI_IFNAME": "eth0",
       "CNI_PATH": "/opt/cni/bin"}


def conf(**kw) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "net", "type": "tortie", **kw}).encode()


def code_of(env: dict, stdin: bytes) -> int:
    with pytest.raises(p.CNIError) as info:
        p.parse_request(env, stdin)
    return info.value.code


# ---- requests -----------------------------------------------------------------------------


def test_cni_args():
    assert p.parse_cni_args("K8S_POD_NAMESPACE=a;K8S_POD_NAME=b") == {"K8S_POD_NAMESPACE": "a", "K8S_POD_NAME": "b"}
    assert p.parse_cni_args("") == {}
    assert p.parse_cni_args("IgnoreUnknown=1;FOO=bar")["FOO"] == "bar"
    assert p.parse_cni_args("IgnoreUnknown=true;FOO=bar")["FOO"] == "bar"
    for bad in ("FOO=bar", "IgnoreUnknown=0;FOO=bar", "novalue", "=x"):
        with pytest.raises(p.CNIError) as info:
            p.parse_cni_args(bad)
        assert info.value.code == p.INVALID_ENV


def test_parse_request_fields():
    req = p.parse_request({**ENV, "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc"},
                          conf(args={"cni": {"labels": [{"key": "app", "value": "web"}]}},
                               runtimeConfig={"portMappings": [{"hostPort": 1}]}))
    assert (req.command, req.container_id, req.ifname, req.netns) == ("ADD", "abc", "eth0", "/run/netns/x")
    assert (req.pod_namespace, req.pod_name, req.handle) == ("ns", "web", "net.abc")
    assert req.labels == {"app": "web"}
    assert req.runtime_config == {"portMappings": [{"hostPort": 1}]}
    assert not req.is_ipam
    assert p.parse_request({**ENV, "_TORTIE_PLUGIN": "tortie-ipam"}, conf()).is_ipam


def test_parse_request_errors():
    assert code_of({**ENV, "CNI_COMMAND": ""}, conf()) == p.INVALID_ENV
    assert code_of(ENV, b"{") == p.DECODE_FAILURE
    assert code_of(ENV, b"[]") == p.DECODE_FAILURE
    assert code_of(ENV, conf(cniVersion="0.2.0")) == p.INCOMPATIBLE_VERSION
    assert code_of({**ENV, "CNI_COMMAND": "CHECK"}, conf(cniVersion="0.3.1")) == p.INCOMPATIBLE_VERSION
    assert code_of({**ENV, "CNI_COMMAND": "GC"}, conf()) == p.INCOMPATIBLE_VERSION
    assert code_of({**ENV, "CNI_COMMAND": "STATUS"}, conf(cniVersion="0.4.0")) == p.INCOMPATIBLE_VERSION
    assert code_of(ENV, conf(name="")) == p.INVALID_CONFIG
    assert code_of(ENV, conf(args={"cni": {"labels": "x"}})) == p.INVALID_CONFIG
    env = dict(ENV)
    del env["CNI_NETNS"]
    assert code_of(env, conf()) == p.INVALID_ENV
    assert p.parse_request({**env, "CNI_COMMAND": "DEL"}, conf()).netns == ""  # DEL may lack it
    assert p.parse_request({"CNI_COMMAND": "GC"}, conf(cniVersion="1.1.0")).command == "GC"


def test_wire_format_roundtrip():
    data = p.encode_request(ENV, b'{"x": 1}', plugin="tortie-ipam")
    env, stdin = p.decode_request(data)
    assert stdin == b'{"x": 1}'
    assert env == {**ENV, "_TORTIE_PLUGIN": "tortie-ipam"}
    with pytest.raises(p.CNIError):
        p.decode_request(data[:-1])
    with pytest.raises(p.CNIError):
        p.decode_request(b"HTTP/1.1 200 OK")


def test_shim_request_matches_protocol():
    """The stand-alone shim frames requests exactly as the server decodes them."""
    captured = {}

    def fake_exchange(path, request):
        captured["path"], captured["request"] = path, request
        return b"\x00{}"

    orig = shim._exchange
    shim._exchange = fake_exchange
    try:
        env = {k.encode(): v.encode() for k, v in ENV.items()} | {b"HOME": b"/root"}
        status, out = shim.run("/opt/cni/bin/tortie-ipam", env, conf(agentSocket="/x/y.sock"))
    finally:
        shim._exchange = orig
    assert (status, out) == (0, b"{}")
    assert captured["path"] == b"/x/y.sock"
    got_env, stdin = p.decode_request(captured["request"])
    assert got_env == {**ENV, "_TORTIE_PLUGIN": "tortie-ipam"}  # HOME is not forwarded
    assert stdin == conf(agentSocket="/x/y.sock")


# ---- results and errors ---------------------------------------------------------------------


RESULT = p.Result(
    interfaces=(p.Interface("tor1", "ee:ee:ee:ee:ee:ee"), p.Interface("eth0", "aa:bb:cc:dd:ee:ff", "/run/netns/x")),
    ips=(p.IPConfig("10.0.0.5/32", "169.254.1.1", 1), p.IPConfig("fd00::5/128", "", 1)),
    routes=(p.RouteSpec("0.0.0.0/0", "169.254.1.1"),),
)


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_result_versions(version):
    d = json.loads(RESULT.to_json(version))
    assert d["cniVersion"] == version
    legacy = version < "1.0.0"
    assert [ip.get("version") for ip in d["ips"]] == (["4", "6"] if legacy else [None, None])
    assert d["interfaces"][1] == {"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/run/netns/x"}
    assert d["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert p.Result.from_json(d) == RESULT


def test_chained_after_shifts_interface_indices():
    prev = p.Result(interfaces=(p.Interface("a"),), ips=(p.IPConfig("192.0.2.1/24", "", 0),),
                    dns={"nameservers": ["192.0.2.53"]})
    merged = RESULT.chained_after(prev)
    assert [i.name for i in merged.interfaces] == ["a", "tor1", "eth0"]
    assert [ip.interface for ip in merged.ips] == [0, 2, 2]
    assert merged.dns == {"nameservers": ["192.0.2.53"]}
    assert RESULT.chained_after(None) is RESULT


def test_errors_map_to_cni_codes():
    assert p.CNIError.from_exception(errors.DatastoreUnavailable("etcd down")).code == 11
    assert p.CNIError.from_exception(errors.ValidationError("bad", field="x")).code == 7
    assert p.CNIError.from_exception(errors.PoolExhausted("full")).code == errors.PoolExhausted.cni_code
    assert p.CNIError.from_exception(RuntimeError("boom")).code == p.GENERIC
    d = json.loads(p.CNIError(11, "try again later", "why").to_json("0.4.0"))
    assert d == {"cniVersion": "0.4.0", "code": 11, "msg": "try again later", "details": "why"}


# ---- the shim's hand-made JSON and byte search ---------------------------------------------------


@given(st.text())
def test_shim_json_string_is_json(text):
    encoded = shim._json_str(text)
    decoded = json.loads(encoded)
    # lone surrogates come back as the same code points
    assert decoded == text


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1), st.sampled_from(["", " ", "\n\t "]))
def test_shim_finds_agent_socket(path, ws):
    raw = ('{"cniVersion":"1.0.0",' + f'"ipam":{{"type":"tortie-ipam","agentSocket"{ws}:{ws}'
           + json.dumps(path) + '}}').encode()
    assert shim._agent_socket(raw) == path.encode()
    found = shim._string_value(raw, b"agentSocket")
    if found is not shim.COMPLEX:  # the byte search never misreads: it decodes or declines
        assert found.decode() == path


def test_shim_unreachable_error_is_valid_json():
    env = {k.encode(): v.encode() for k, v in ENV.items()}
    status, out = shim.run("tortie", env, conf(agentSocket='/nonexistent/"quoted"\\.sock'))
    assert status == 1
    d = json.loads(out)
    assert d["code"] == 11 and d["cniVersion"] == "1.0.0"
    assert d["details"].startswith('/nonexistent/"quoted"\\.sock: ')


# ---- installation -------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [True, False])
def test_install_writes_standalone_executables(tmp_path, compiled):
    paths = install(str(tmp_path), compiled=compiled)
    assert [os.path.basename(x) for x in paths] == ["tortie", "tortie-ipam"]
    assert ("marshal.loads" in open(paths[0]).read()) == compiled
    for path in paths:
        first = open(path).readline()
        interp, flags = first[2:].split()
        assert flags == "-IS"
        assert interp == real_interpreter() and open(interp, "rb").read(4) == b"\x7fELF"
        assert os.access(path, os.X_OK)
        v = subprocess.run([path], input=b'{"cniVersion":"0.4.0"}', env={"CNI_COMMAND": "VERSION"},
                           capture_output=True)
        assert v.returncode == 0 and json.loads(v.stdout)["cniVersion"] == "0.4.0"


def test_shim_hot_path_imports_no_json_socket_or_os(tmp_path, cni_node):
    """An ADD through the installed shim imports nothing beyond the interpreter's built-ins."""
    (path,) = [x for x in install(str(tmp_path)) if x.endswith("/tortie")]
    pod_ns = cni_node.pod_ns()
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "importcheck", "CNI_NETNS": f"/run/netns/{pod_ns}",
           "CNI_IFNAME": "eth0", "CNI_PATH": str(tmp_path)}
    r = subprocess.run(["ip", "netns", "exec", cni_node.ns, real_interpreter(), "-IS", "-X", "importtime", path],
                       input=json.dumps(cni_node.config()).encode(), env=env, capture_output=True)
    assert r.returncode == 0, r.stdout
    imported = {line.split("|")[-1].strip() for line in r.stderr.decode().splitlines() if "|" in line}
    assert imported  # importtime did report
    assert not imported & {"json", "socket", "os", "struct", "re", "subprocess"}, imported
    assert cni_node.exec_plugin("DEL", cni_node.config(), cid="importcheck", netns=pod_ns).rc == 0


def test_console_script_entry_point():
    exe = os.path.join(os.path.dirname(sys.executable), "tortie")
    v = subprocess.run([exe], input=b'{"cniVersion":"1.1.0"}', env={"CNI_COMMAND": "VERSION"}, capture_output=True)
    assert v.returncode == 0 and json.loads(v.stdout)["cniVersion"] == "1.1.0"
