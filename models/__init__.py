"""Methods and backbones, each in a registry. Importing this package registers every method."""
from __future__ import annotations

from models.backbones import BACKBONES, build_backbone
from models.base import METHODS, DataInfo, Method, MethodConfig, Progress, register_method

# Each import registers its method(s).
from models import propos as _propos  # noqa: F401,E402
from models import byol as _byol  # noqa: F401,E402


def method_config_class(name: str) -> type[MethodConfig]:
    return METHODS.get(name).config_class


def build_method(method_cfg: MethodConfig, *, backbone: str, norm: str, data: DataInfo) -> Method:
    """Instantiate the method named by `method_cfg.name`."""
    return METHODS.get(method_cfg.name)(method_cfg, backbone=backbone, norm=norm, data=data)


__all__ = ["BACKBONES", "METHODS", "DataInfo", "Method", "MethodConfig", "Progress", "build_backbone",
           "build_method", "method_config_class", "register_method"]
