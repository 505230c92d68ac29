"""The lab fixtures for end-to-end tests (a plain re-export from tests/lab_fixtures.py)."""

from lab_fixtures import lab_factory, new_lab_name, policies  # noqa: F401
