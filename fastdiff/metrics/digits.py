"""The `digits` extractor: a small CNN trained by fastdiff on scikit-learn's digits (16x16 grey,
in [-1, 1], as fastdiff.data.digits gives them). Its penultimate layer gives FID features, its
softmax an Inception-Score analogue. Trained by scripts/train_digits_classifier.py, which writes
fastdiff/assets/digits_classifier.safetensors and its JSON config (with the held-out accuracy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fastdiff.metrics.base import Extractor

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS = ASSETS / "digits_classifier.safetensors"


@dataclass
class DigitsConfig:
    size: int = 16
    channels: tuple[int, int] = (16, 32)
    features: int = 64
    classes: int = 10
    dropout: float = 0.3

    @classmethod
    def from_dict(cls, d: dict) -> DigitsConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(**d)


def _conv(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.SiLU())


class DigitsClassifier(Extractor):
    """conv-conv-pool twice, then a `features`-wide layer (the FID features) and the classifier."""

    name = "digits"

    def __init__(self, config: DigitsConfig | None = None) -> None:
        super().__init__()
        self.sha256: str | None = None  # of the weight file it was loaded from
        self.config = c = config or DigitsConfig()
        c1, c2 = c.channels
        self.body = nn.Sequential(
            _conv(1, c1), _conv(c1, c1), nn.MaxPool2d(2),  # (N, c1, size/2, size/2)
            _conv(c1, c2), _conv(c2, c2), nn.MaxPool2d(2),  # (N, c2, size/4, size/4)
            nn.Flatten(),
            nn.Linear(c2 * (c.size // 4) ** 2, c.features), nn.SiLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(c.dropout), nn.Linear(c.features, c.classes))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> (N, 1, size, size): RGB averaged to grey, other
        sizes resized (bilinear, antialiased)."""
        if x.shape[1] not in (1, 3):
            raise ValueError(
                f"the digits extractor takes grey (C=1) or RGB (C=3) images, got {x.shape[1]} "
                "channels"
            )
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        size = self.config.size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(x))  # (N, features)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, classes)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(-1)

    def save(self, path: str | Path, info: dict | None = None) -> Path:
        """Write the weights (safetensors) and, next to them, a .json with the config and
        `info` (how it was trained, its held-out accuracy)."""
        path = Path(path)
        config = dataclasses.asdict(self.config)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
            str(path),
            metadata={"config": json.dumps(config, sort_keys=True)},
        )
        text = json.dumps({"config": config, **(info or {})}, indent=2, sort_keys=True)
        path.with_suffix(".json").write_text(text + "\n")
        return path

    @classmethod
    def load(
        cls, path: str | Path | None = None, device: str | torch.device = "cpu"
    ) -> DigitsClassifier:
        """The shipped classifier (or the one at `path`), in eval mode."""
        path = Path(path) if path is not None else WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(
                f"no digits classifier at {path}; the shipped one is made by "
                "`python scripts/train_digits_classifier.py`"
            )
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
        model = cls(DigitsConfig.from_dict(config))
        model.load_state_dict(load_file(str(path)))
        model.sha256 = file_sha256(path)
        return model.to(device).eval().requires_grad_(False)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
