"""onnxruntime runners: an exported denoiser as a fastdiff `model`, and the whole-step graph
as a sampling loop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fastdiff.ops import noise as noise_ops

_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _session(path, providers):
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a test dependency
        raise ImportError("OnnxRunner needs onnxruntime: pip install onnxruntime") from e
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(path), options, providers=list(providers or ["CPUExecutionProvider"])
    )


class _Runner:
    def __init__(self, path, providers=None):
        self.path = Path(path)
        self.session = _session(self.path, providers)
        self.input_types = {i.name: _NP[i.type] for i in self.session.get_inputs()}
        self.input_shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def _feed(self, named: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        missing = sorted(set(self.input_types) - set(named))
        extra = sorted(set(named) - set(self.input_types))
        if missing or extra:
            raise ValueError(
                f"{self.path.name} takes inputs {list(self.input_types)}; missing {missing}, "
                f"unexpected {extra} (conditions are keyword arguments named like the inputs)"
            )
        return {
            k: named[k].detach().cpu().numpy().astype(self.input_types[k], copy=False)
            for k in self.input_types
        }


class OnnxRunner(_Runner):
    """An exported denoiser (fastdiff.export.to_onnx) run by onnxruntime, called like the
    original: runner(x, t, **cond) -> prediction, a torch tensor on x's device in x's dtype.
    t may be a scalar or (B,); cond keywords are the graph's other inputs (context,
    class_labels)."""

    def __call__(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        out = self.session.run(
            self.output_names[:1], self._feed({"sample": x, "timestep": t, **cond})
        )
        return torch.from_numpy(out[0]).to(device=x.device, dtype=x.dtype)


class OnnxStepRunner(_Runner):
    """A whole-step graph (to_onnx(..., include_step=True)) run by onnxruntime.

    `step(x, i, noise, history, **cond)` runs one row; `sample(shape, seed=..., cond=...)`
    runs every row of the baked-in plan, feeding the counter-based noise of fastdiff.noise, and
    returns what fastdiff.sample with the same sampler, steps, seed and model returns."""

    @property
    def rows(self) -> int:
        return int(self.metadata["fastdiff.rows"])

    @property
    def n_history(self) -> int:
        return int(self.metadata["fastdiff.n_history"])

    @property
    def init_scale(self) -> float:
        return float(self.metadata["fastdiff.init_scale"])

    def step(self, x, i: int, noise, history=None, **cond):
        named = {"x": x, "step": torch.tensor([i], dtype=torch.int64), "noise": noise, **cond}
        if self.n_history:
            named["history"] = history
        out = self.session.run(self.output_names, self._feed(named))
        x_next = torch.from_numpy(out[0])
        return x_next, (torch.from_numpy(out[1]) if self.n_history else None)

    def sample(self, shape, *, seed: int = 0, sample_offset: int = 0, cond=None, noise=None):
        shape = tuple(shape)
        if noise is None:  # the noise of fastdiff/noise.py, drawn by the fused CPU kernel
            x = noise_ops.gaussian_(
                torch.empty(shape), seed, 0, sample_offset=sample_offset, scale=self.init_scale
            )
        else:
            x = noise.float() * self.init_scale
        history = torch.zeros(self.n_history, *shape) if self.n_history else None
        z = torch.empty(shape)
        for i in range(self.rows):
            noise_ops.gaussian_(z, seed, i + 1, sample_offset=sample_offset)
            x, history = self.step(x, i, z, history, **(cond or {}))
            if not math.isfinite(float(x.abs().max())):
                raise FloatingPointError(f"non-finite values at step {i} of {self.rows}")
        return x
