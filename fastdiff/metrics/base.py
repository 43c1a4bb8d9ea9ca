"""What every metric shares: the Score it returns, the Extractor interface, and images streamed
in batches through an extractor.

Images are (N, C, H, W) in [-1, 1], as fastdiff.sample returns them: a tensor, a numpy array
(uint8 arrays are read as [0, 255]), or any iterable of such batches (a generator of samples,
so nothing needs all N images in memory at once).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

_RANGE_SLACK = 1e-3  # rounding may push [-1, 1] images slightly out


@dataclass(frozen=True)
class Score:
    """A metric's value with the feature extractor it came from; `std` over subsets or splits
    for KID and IS. str(score) reads e.g. "FID 3.214 [digits] (500 vs 1797 images)"."""

    metric: str
    value: float
    extractor: str
    std: float | None = None
    n: tuple[int, ...] = ()

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        digits = 5 if self.metric == "KID" else 3
        text = f"{self.metric} {self.value:.{digits}f}"
        if self.std is not None:
            text += f" ± {self.std:.{digits}f}"
        text += f" [{self.extractor}]"
        if self.n:
            text += f" ({' vs '.join(str(k) for k in self.n)} images)"
        return text


class Extractor(nn.Module):
    """Images (N, C, H, W) in [-1, 1] -> features (N, D); a classifier may also give class
    probabilities (N, K) for the Inception Score. `name` is printed next to every score."""

    name: str = "module"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            f"extractor {self.name!r} has no classifier head, so it gives no Inception Score; "
            "use 'digits' or 'inception-v3-fid'"
        )


class ModuleExtractor(Extractor):
    """Any user torch.nn.Module whose output (N, ...) is flattened into features (N, D)."""

    def __init__(self, module: nn.Module, name: str | None = None) -> None:
        super().__init__()
        self.module = module
        self.name = name or f"module:{type(module).__name__}"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"extractor {self.name}: the module returned {type(out).__name__}; it must "
                "return a feature tensor (N, D) (or (N, ...), flattened)"
            )
        return out.reshape(out.shape[0], -1)


def as_images(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """One batch as a float tensor (N, C, H, W) in [-1, 1]; (N, H, W) is taken as grey."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"images must be a tensor or array (N, C, H, W) in [-1, 1], or an iterable of them; "
            f"got {type(x).__name__}"
        )
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W) or (N, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    if not x.dtype.is_floating_point:
        raise TypeError(f"images must be floats in [-1, 1] or uint8, got {x.dtype}")
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= -1 - _RANGE_SLACK and hi <= 1 + _RANGE_SLACK):
            raise ValueError(
                f"images have values in [{lo:g}, {hi:g}]; expected [-1, 1] (clamp samples that "
                "overshoot with x.clamp(-1, 1), as saving them as images would; rescale: "
                "2 * x - 1 for [0, 1], x / 127.5 - 1 for [0, 255])"
            )
    return x


def image_batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of at most `batch_size` images from a tensor/array or an iterable of batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(images, torch.Tensor | np.ndarray):
        images = as_images(images)
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    if not isinstance(images, Iterable):
        as_images(images)  # raises the TypeError that says what is expected
    for batch in images:
        batch = as_images(batch)
        for start in range(0, batch.shape[0], batch_size):
            yield batch[start : start + batch_size]


@torch.no_grad()
def extract(
    images,
    extractor: Extractor,
    *,
    head: str = "features",
    batch_size: int = 250,
    device: str | torch.device | None = None,
) -> Iterator[torch.Tensor]:
    """Run `extractor` (its `features` or `probabilities` head) over `images` batch by batch;
    yields float64 CPU tensors (B, D)."""
    device = torch.device(device) if device is not None else _module_device(extractor)
    extractor = extractor.to(device).eval()
    fn = getattr(extractor, head)
    for batch in image_batches(images, batch_size):
        if batch.shape[0]:
            out = fn(batch.to(device, torch.float32))
            yield out.reshape(out.shape[0], -1).to("cpu", torch.float64)


def extract_all(images, extractor: Extractor, **kwargs) -> np.ndarray:
    """Every output of `extract` in one float64 array (N, D)."""
    outs = [f.numpy() for f in extract(images, extractor, **kwargs)]
    if not outs:
        raise ValueError("no images: the image set is empty")
    return np.concatenate(outs)


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def is_feature_matrix(x) -> bool:
    """2-D tensors and arrays are precomputed features (N, D); images have 3 or 4 dims."""
    return isinstance(x, torch.Tensor | np.ndarray) and x.ndim == 2


def as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)
