"""Install the CNI shim as stand-alone executables: `DIR/tortie` and `DIR/tortie-ipam`.

    python -m tortie.cni.install --bin-dir /opt/cni/bin

Each is `tortie/cni/shim.py` (as compiled code, or as source with --source) behind a
first line naming the real interpreter binary with `-IS` (isolated, no site): no venv,
no site-packages, no pyenv shim in the exec path, so a CNI call costs the bare
interpreter start plus the shim itself. Files
are written to a temporary name and renamed, so a runtime never execs a half-written one.
"""

from __future__ import annotations

import argparse
import marshal
import os
import subprocess
import sys
from pathlib import Path

from tortie.cni import shim

NAMES = ("tortie", "tortie-ipam")


def real_interpreter(executable: str | None = None) -> str:
    """The interpreter binary itself: symlinks (venvs) resolved, wrapper scripts
    (pyenv shims) asked for their sys.executable."""
    exe = os.path.realpath(executable or sys.executable)
    with open(exe, "rb") as f:
        is_elf = f.read(4) == b"\x7fELF"
    if not is_elf:
        out = subprocess.run([exe, "-I", "-S", "-c", "import sys; print(sys.executable)"],
                             check=True, capture_output=True, text=True)
        exe = os.path.realpath(out.stdout.strip())
    return exe


def shim_source(interpreter: str, *, compiled: bool | None = None) -> bytes:
    """The executable's bytes. Compiled (the default when `interpreter` is the one running
    this): the shim's code object marshalled into a one-line loader, which spares every
    CNI call compiling the shim's source (about 1 ms of each exec). Marshal data is only
    valid for the exact interpreter that made it; the interpreter line pins that one."""
    text = Path(shim.__file__).read_text()
    if text.startswith("#!"):
        text = text.split("\n", 1)[1]
    if compiled is None:
        compiled = os.path.realpath(interpreter) == real_interpreter()
    if compiled:
        code = marshal.dumps(compile(text, "tortie/cni/shim.py", "exec"))
        text = (f"# tortie CNI shim, compiled from tortie/cni/shim.py for {sys.version.split()[0]} "
                f"by tortie.cni.install\nimport marshal\nexec(marshal.loads({code!r}))\n")
    return f"#!{interpreter} -IS\n{text}".encode()


def install(bin_dir: str, interpreter: str | None = None, *, compiled: bool | None = None) -> list[str]:
    """Write both executables into bin_dir; returns their paths."""
    source = shim_source(real_interpreter(interpreter), compiled=compiled)
    os.makedirs(bin_dir, exist_ok=True)
    written = []
    for name in NAMES:
        path = os.path.join(bin_dir, name)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(source)
        os.chmod(tmp, 0o755)
        os.rename(tmp, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tortie.cni.install", description=__doc__.split("\n")[0])
    ap.add_argument("--bin-dir", default="/opt/cni/bin")
    ap.add_argument("--python", default=None, help="interpreter to name (default: this one, resolved)")
    ap.add_argument("--source", action="store_true", help="install the readable source, not compiled code")
    args = ap.parse_args(argv)
    for path in install(args.bin_dir, args.python, compiled=False if args.source else None):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
