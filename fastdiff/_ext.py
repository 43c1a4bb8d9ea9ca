"""The compiled extension fastdiff._C: loaded lazily, once, with a clear error when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BUILD_HINT = (
    "build it from the repository root with `pip install -e . --no-build-isolation` "
    "(or `make build`)"
)

_module: ModuleType | None = None


def load() -> ModuleType:
    """Import fastdiff._C (which registers the torch.ops.fastdiff ops) and their fake impls."""
    global _module
    if _module is not None:
        return _module
    try:
        module = importlib.import_module("fastdiff._C")
    except ImportError as e:
        raise ImportError(
            f"fastdiff's compiled extension fastdiff._C is not available ({e}); {BUILD_HINT}"
        ) from e
    built_with = module.build_info()["torch_version"]
    if built_with != torch.__version__:
        raise ImportError(
            f"fastdiff._C was built against torch {built_with} but torch {torch.__version__} is "
            f"installed; rebuild it: {BUILD_HINT}"
        )
    _module = module
    importlib.import_module("fastdiff.ops._library")
    return module


def available() -> bool:
    try:
        load()
    except ImportError:
        return False
    return True


def build_info() -> dict:
    """How fastdiff._C was compiled: compiler, flags, CUDA, OpenMP, torch version, ops."""
    return dict(load().build_info())
