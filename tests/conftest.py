import os

import pytest
import torch

# Triton kernels run compiled on a GPU, interpreted on a CPU-only machine; set before any kernel
# is defined
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# one thread per worker when pytest-xdist runs several (oversubscribed OpenMP crawls)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture
def toy_model():
    """A smooth, nonlinear stand-in for a denoiser: model(x, t) -> prediction."""

    def model(x, t, **cond):
        tt = (t.to(x.dtype) / 1000).view(-1, *[1] * (x.ndim - 1))
        return 0.6 * x * torch.cos(tt) + 0.3 * torch.sin(3 * x + tt) + 0.1 * tt

    return model
