"""Where the kernel tests run each backend, shared by the test modules."""

import pytest
import torch


def device_for(backend: str) -> str:
    """The device a backend's test runs on here: `cpu` on the CPU; `cuda` on a GPU (skipped where
    there is none); `triton` on a GPU, else interpreted on the CPU (tests/conftest.py sets
    TRITON_INTERPRET=1)."""
    if backend == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if backend == "cuda":
            pytest.skip("cuda backend: no CUDA device here")
        return "cpu"
    return "cuda"
