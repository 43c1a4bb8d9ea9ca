"""fastdiff.sample's loop reads nothing from the device: the row, the noise counter and the
non-finite flag stay on the device, and the one host read is the flag after the loop.

On CPU, every Tensor method that hands a value to Python (item, tolist, bool/int/float/index
conversion, numpy, cpu) is counted from the first model call on; before it, sample() builds the
plan on host tables (no device involved). On CUDA, torch's sync debug mode counts real syncs."""

import warnings

import pytest
import torch

import fastdiff
from fastdiff.ops.step import step_op

pytestmark = pytest.mark.gpu  # scripts/gpu_check.sh's test phase

SYNCING = (
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__array__",
    "numpy",
    "cpu",
)


class SyncCounter:
    """Patches the Tensor methods above; counts (name, caller) while `on`."""

    def __init__(self, monkeypatch):
        self.on, self.calls = False, []
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            if self.on:
                import traceback

                caller = traceback.extract_stack(limit=2)[0]
                self.calls.append(f"{name} at {caller.filename}:{caller.lineno}")
            return original(tensor, *args, **kwargs)

        return counted

    def model(self, model):
        """model, switching the counter on at its first call (the loop's start)."""

        def wrapped(x, t, **cond):
            self.on = True
            return model(x, t, **cond)

        return wrapped


def toy(x, t, **cond):
    tt = (t.to(x.dtype) / 1000).view(-1, *[1] * (x.ndim - 1))
    out = 0.6 * x * torch.cos(tt) + 0.3 * torch.sin(3 * x + tt)
    return out + 0.1 * cond["c"] if "c" in cond else out


BACKENDS = ["cpu", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "sampler, options",
    [
        ("ddim", dict(eta=1.0)),
        ("heun", {}),
        ("dpmpp_3m_sde", dict(clamp=(-3.0, 3.0))),
        ("unipc", dict(guidance_scale=2.0)),
    ],
)
def test_loop_has_one_host_read(monkeypatch, backend, sampler, options):
    reason = step_op.get(backend).ready()
    if reason:
        pytest.skip(f"{backend}: {reason}")
    if "guidance_scale" in options:
        c = torch.ones(1, 3, 4, 4)
        options = {**options, "cond": {"c": c}, "uncond": {"c": -c}}
    counter = SyncCounter(monkeypatch)
    x = fastdiff.sample(
        counter.model(toy), (2, 3, 4, 4), sampler=sampler, steps=5, backend=backend, **options
    )
    counter.on = False
    assert torch.isfinite(x).all()
    assert len(counter.calls) == 1, counter.calls  # the non-finite check after the loop
    assert counter.calls[0].startswith("__int__") and "sample.py" in counter.calls[0]


def test_counter_sees_a_sync(monkeypatch):
    """The counter is not blind: a model that reads a device value is caught at every step."""
    counter = SyncCounter(monkeypatch)

    def syncing(x, t):
        return x * (float(t[0]) / 1000)

    fastdiff.sample(counter.model(syncing), (1, 2, 3), sampler="euler", steps=3)
    counter.on = False
    assert sum(c.startswith("__float__") for c in counter.calls) == 3, counter.calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_loop_does_not_synchronize(cuda_graph):
    """torch's sync debug mode warns at every synchronizing CUDA call: the sampling loop makes
    exactly one (reading the non-finite flag after the loop). With a graph, the model runs
    three times in Python (row 0 eagerly, the warm-up, the capture; torch.cuda.graph
    synchronizes before capturing): counting starts at the captured call, so the replays are
    what is counted (a sync inside the capture would fail it)."""
    model_calls = []

    def model(x, t, **cond):
        if len(model_calls) == 2 * int(cuda_graph):
            torch.cuda.set_sync_debug_mode("warn")  # from the loop's start on
        model_calls.append(1)
        return toy(x, t, **cond)

    c = torch.ones(1, 4, 8, 8, device="cuda")
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fastdiff.sample(
                model,
                (2, 4, 8, 8),
                sampler="dpmpp_2m_sde",
                steps=6,
                device="cuda",
                guidance_scale=3.0,
                cond={"c": c},
                uncond={"c": -c},
                cuda_graph=cuda_graph,
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
