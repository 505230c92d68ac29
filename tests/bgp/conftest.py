"""BGP test fixtures (the helpers themselves live in bgphelpers.py)."""

from bgphelpers import lab, workdir  # noqa: F401
