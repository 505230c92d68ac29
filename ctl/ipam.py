"""`tortiectl ipam`: the module `tortie.ctl.main` plugs in; the commands live in ipam_cmd."""

from tortie.ctl.ipam_cmd import register

__all__ = ["register"]
