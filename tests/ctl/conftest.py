import io
import json

import pytest

from tortie.ctl.main import main


class Ctl:
    """Runs tortiectl in-process against the test's etcd prefix."""

    def __init__(self, config, tmp_path) -> None:
        self.flags = ["--etcd-endpoints", ",".join(config.endpoints), "--etcd-prefix", config.prefix]
        self.tmp_path = tmp_path
        self.n = 0

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        rc = main([*self.flags, *argv], out=out, err=err)
        return rc, out.getvalue(), err.getvalue()

    def ok(self, *argv: str) -> str:
        rc, out, err = self(*argv)
        assert rc == 0, err
        return out

    def json(self, *argv: str):
        return json.loads(self.ok(*argv, "-o", "json"))

    def file(self, text: str) -> str:
        self.n += 1
        path = self.tmp_path / f"r{self.n}.yaml"
        path.write_text(text)
        return str(path)


@pytest.fixture
def ctl(etcd, etcd_config, tmp_path):
    return Ctl(etcd_config, tmp_path)
