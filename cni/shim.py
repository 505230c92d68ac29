#!/usr/bin/env python3
"""The `tortie` and `tortie-ipam` CNI plugin executables: a thin forwarder.

The container runtime execs this file once per CNI call, so its start-up is the
latency budget. It is one self-contained file that imports nothing beyond the
interpreter's built-in modules (`posix`, `_socket`): no `os`, `json` or `socket`
(those imports alone cost more than the rest of the call). `tortie.cni.install`
copies it into a CNI bin dir with an `-IS` interpreter line.

Wire format to the agent's CNI server (unix stream socket):

    request  = b"TCNI1" + u32 len + env block + u32 len + stdin bytes
               env block = b"KEY=VALUE" items joined by NUL: the CNI_* variables
               plus _TORTIE_PLUGIN=<the name this file was run as>
    response = one byte exit status + the bytes to print on stdout (until EOF)

VERSION is answered here. When the agent cannot be reached, the shim prints a CNI
error itself: code 11 ("try again later"; 50 for STATUS), exit status 1; but code 5
when the caller may not open the socket (EACCES: no retry mends that), and code 7 for
a request over the agent's size limit (checked here, before sending).
"""

import _socket
import posix
import sys

MAGIC = b"TCNI1"
DEFAULT_SOCKET = b"/run/tortie/cni.sock"
COMPLEX = object()  # a value the byte search will not decode (see _string_value)
SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
TIMEOUT = 120.0  # the runtime has its own deadline; this only stops a hung agent pinning us
MAX_REQUEST = 4 << 20  # what the agent reads of one request (tortie.agent.cni_server.MAX_REQUEST)
EACCES, EPERM = 13, 1  # errno: the socket is not ours to open (no `errno` import here)


def _read_stdin():
    chunks = []
    while True:
        try:
            chunk = posix.read(0, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _write(fd, data):
    view = memoryview(data)
    while view:
        n = posix.write(fd, view)
        view = view[n:]


def _json_str(text):
    """A JSON string literal, escaped by hand (json is too slow to import here)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _string_value(config, key):
    """The string value of `"key": "..."` found by a byte search, or None.

    Good enough for the two fields the shim needs (agentSocket, cniVersion); the
    agent does the real parsing. A value with JSON escapes other than \\" \\\\ \\/
    gives COMPLEX: the caller then parses the config properly.
    """
    at = config.find(b'"' + key + b'"')
    if at < 0:
        return None
    i = at + len(key) + 2
    n = len(config)
    while i < n and config[i] in b" \t\r\n":
        i += 1
    if i >= n or config[i] != 0x3A:  # ':'
        return None
    i += 1
    while i < n and config[i] in b" \t\r\n":
        i += 1
    if i >= n or config[i] != 0x22:  # '"'
        return None
    i += 1
    out = bytearray()
    while i < n:
        c = config[i]
        if c == 0x22:
            return bytes(out)
        if c == 0x5C:  # backslash
            i += 1
            if i >= n or config[i] not in b'"\\/':
                return COMPLEX
            c = config[i]
        out.append(c)
        i += 1
    return None


def _agent_socket(config):
    """agentSocket from the network config (top level or ipam), else the default."""
    path = _string_value(config, b"agentSocket")
    if path is COMPLEX:  # rare: decode it properly, off the hot path
        import json

        def find(obj):
            if isinstance(obj, dict):
                if isinstance(obj.get("agentSocket"), str):
                    return obj["agentSocket"]
                for value in obj.values():
                    found = find(value)
                    if found:
                        return found
            return None

        try:
            path = (find(json.loads(config)) or "").encode("utf-8", "surrogatepass")
        except (ValueError, UnicodeError):
            path = None
    return path or DEFAULT_SOCKET


def _version_of(config):
    v = _string_value(config, b"cniVersion")
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
        if v in SUPPORTED:
            return v
    return "1.1.0"


def _error(version, code, msg, details):
    body = (f'{{"cniVersion":{_json_str(version)},"code":{code:d},'
            f'"msg":{_json_str(msg)},"details":{_json_str(details)}}}\n')
    return body.encode("utf-8", "replace")


def _exchange(path, request):
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        try:
            sock.sendall(request)
            sock.shutdown(_socket.SHUT_WR)
        except OSError:  # the agent may answer (and close) before reading it all
            pass
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        sock.close()


def run(argv0, environ, stdin):
    """One CNI call: returns (exit status, stdout bytes). Pure but for the socket."""
    command = environ.get(b"CNI_COMMAND", b"")
    if command == b"VERSION":
        versions = '","'.join(SUPPORTED)
        body = f'{{"cniVersion":"{_version_of(stdin)}","supportedVersions":["{versions}"]}}\n'
        return 0, body.encode()
    plugin = argv0.rsplit("/", 1)[-1] or "tortie"
    items = [k + b"=" + v for k, v in environ.items() if k.startswith(b"CNI_")]
    items.append(b"_TORTIE_PLUGIN=" + plugin.encode("utf-8", "replace"))
    env_block = b"\0".join(items)
    request = b"".join((
        MAGIC, len(env_block).to_bytes(4, "big"), env_block,
        len(stdin).to_bytes(4, "big"), stdin,
    ))
    if len(request) > MAX_REQUEST:
        return 1, _error(_version_of(stdin), 7, f"network configuration of {len(stdin)} bytes is too large: "
                         f"tortie takes at most {MAX_REQUEST} bytes (4 MiB) with the environment", "")
    path = _agent_socket(stdin)
    try:
        reply = _exchange(path, request)
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        where = f"{path.decode('utf-8', 'replace')}: {reason}"
        if exc.errno in (EACCES, EPERM):  # not something time mends: code 5, not 11
            return 1, _error(_version_of(stdin), 5, "not permitted to open the tortie agent's socket "
                             "(it is root's, mode 0600): run the plugin as root", where)
        return 1, _unreachable(stdin, command, "try again later: tortie agent not reachable", where)
    if not reply:
        return 1, _unreachable(stdin, command, "try again later: tortie agent closed the connection",
                               path.decode("utf-8", "replace"))
    return reply[0], reply[1:]


def _unreachable(stdin, command, msg, details):
    """The error when the agent cannot answer. Off the hot path, so the config is parsed
    properly here: a config that is not JSON, or of a version nobody speaks, is the
    caller's error (6, 1) rather than ours (11; 50 for STATUS)."""
    import json

    try:
        config = json.loads(stdin)
    except ValueError as exc:
        return _error("1.1.0", 6, "network config on stdin is not JSON", str(exc))
    if not isinstance(config, dict):
        return _error("1.1.0", 6, "network config on stdin is not a JSON object", "")
    if config.get("cniVersion") not in SUPPORTED:
        return _error("1.1.0", 1, f"incompatible CNI version {config.get('cniVersion')!r}",
                      "supported: " + ", ".join(SUPPORTED))
    return _error(config["cniVersion"], 50 if command == b"STATUS" else 11, msg, details)


def main():
    status, out = run(sys.argv[0] if sys.argv else "tortie", posix.environ, _read_stdin())
    if out:
        _write(1, out)
    return status


if __name__ == "__main__":
    sys.exit(main())
