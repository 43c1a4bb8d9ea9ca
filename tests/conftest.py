import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def toy_model():
    """A smooth, nonlinear stand-in for a denoiser: model(x, t) -> prediction."""

    def model(x, t, **cond):
        tt = (t.to(x.dtype) / 1000).view(-1, *[1] * (x.ndim - 1))
        return 0.6 * x * torch.cos(tt) + 0.3 * torch.sin(3 * x + tt) + 0.1 * tt

    return model
