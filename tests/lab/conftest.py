"""The lab fixtures (`lab_factory`, `new_lab_name`); they live in tortie.lab.testing so
any other test folder's conftest.py can import them the same way."""

from tortie.lab.testing import lab_factory, new_lab_name  # noqa: F401
