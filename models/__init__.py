"""Methods and backbones, each in a registry. Importing this package registers every method."""
from __future__ import annotations

from models.backbones import BACKBONES, build_backbone
from models.base import METHODS, DataInfo, Method, MethodConfig, Progress, Stage, StageContext, register_method

import importlib  # noqa: E402
import pkgutil  # noqa: E402

# Importing a method module registers its method(s): one file per method, found here by name so that
# adding a method never edits this file.
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("backbones", "base") and not _module.name.startswith("_"):
        importlib.import_module(f"models.{_module.name}")


def method_config_class(name: str) -> type[MethodConfig]:
    return METHODS.get(name).config_class


def build_method(method_cfg: MethodConfig, *, backbone: str, norm: str, data: DataInfo) -> Method:
    """Instantiate the method named by `method_cfg.name`."""
    return METHODS.get(method_cfg.name)(method_cfg, backbone=backbone, norm=norm, data=data)


__all__ = ["BACKBONES", "METHODS", "DataInfo", "Method", "MethodConfig", "Progress", "Stage", "StageContext", "build_backbone",
           "build_method", "method_config_class", "register_method"]
