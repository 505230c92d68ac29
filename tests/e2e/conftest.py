"""The lab fixtures for end-to-end tests (a plain re-export from tortie.lab.testing)."""

from tortie.lab.testing import lab_factory, new_lab_name  # noqa: F401
