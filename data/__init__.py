"""The data axis: dataset registry (`build_dataset`), batched on-device augmentation (`BatchAugment`),
and the training / evaluation loaders (`build_train_loader`, `iterate_shard`).

Names are imported lazily, so that `import data.config` (the config loader's schema) stays free of
torch and torchvision.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "data.config": ("AugmentConfig", "DataConfig"),
    "data.datasets": ("DATASETS", "ImageData", "build_dataset", "build_eval_dataset", "build_train_dataset",
                      "decode_files"),
    "data.augment": ("AugmentParams", "BatchAugment", "EvalTransform", "build_batch_augments",
                     "build_eval_transform", "build_sample_transform", "normalize"),
    "data.loaders": ("DeviceTensorLoader", "TrainBatch", "TrainLoader", "WorkersLoader", "build_train_loader",
                     "iterate_shard", "shard_bounds"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
