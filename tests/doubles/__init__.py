"""Test doubles: in-memory or in-process stand-ins for tortie's seams, for any test folder.

- `doubles.apiserver_fake`: a real-HTTP Kubernetes API server (`FakeAPIServer`).
- `doubles.kernel_fake`: the routing managers' kernel in memory (`FakeKernel`).

`tests/conftest.py` puts `tests/` on the import path, so `from doubles.X import ...`
works from every test folder.
"""
