"""The lab fixtures for fault tests (a plain re-export from tests/lab_fixtures.py)."""

from lab_fixtures import lab_factory, new_lab_name  # noqa: F401
