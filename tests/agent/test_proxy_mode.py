"""The node setting that chooses the Service proxy: tortie or none; anything else is one line."""

from __future__ import annotations

import pytest

from tortie.agent import config
from tortie.errors import ValidationError

BASE = {"TORTIE_NODENAME": "n1", "TORTIE_BGP_ENABLED": "false"}


def test_proxy_mode_defaults_to_none_and_takes_tortie():
    assert config.load(BASE).proxy_mode == "none"
    assert config.load({**BASE, "TORTIE_PROXY_MODE": "tortie"}).proxy_mode == "tortie"


def test_an_unknown_proxy_mode_is_refused_by_name():
    with pytest.raises(ValidationError) as err:
        config.load({**BASE, "TORTIE_PROXY_MODE": "ipvs"})
    assert err.value.field == "TORTIE_PROXY_MODE" and "tortie, none" in str(err.value)
    assert "\n" not in str(err.value)
