"""The lab fixtures (`lab_factory`, `new_lab_name`); they live in tests/lab_fixtures.py so
any other test folder's conftest.py can import them the same way."""

from lab_fixtures import lab_factory, new_lab_name  # noqa: F401
