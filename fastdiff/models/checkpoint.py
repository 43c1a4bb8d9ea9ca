"""Model checkpoints: a directory with model.safetensors (the weights) and config.json (the
model's config). Nothing is pickled; the config is also stored in the safetensors metadata, so
a lone .safetensors file loads too."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT = "fastdiff"


def save(state: dict[str, torch.Tensor], config: dict, path: str | Path) -> Path:
    """Write `path`/model.safetensors and `path`/config.json; returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2, sort_keys=True)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, str(path / WEIGHTS), metadata={"format": FORMAT, "config": text})
    (path / CONFIG).write_text(text + "\n")
    return path


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """(config, state dict) from a checkpoint directory or a .safetensors file."""
    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}: expected a directory with {WEIGHTS} and {CONFIG} "
            "(written by model.save(path)) or a .safetensors file"
        )
    with safe_open(str(weights), framework="pt", device=str(device)) as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if path.is_dir() and (path / CONFIG).is_file():
        config = json.loads((path / CONFIG).read_text())
    elif "config" in metadata:
        config = json.loads(metadata["config"])
    else:
        raise ValueError(f"{weights} has no config: neither {CONFIG} next to it nor in metadata")
    return config, state


def _listing(items: list[str], limit: int = 12) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_state_dict(
    expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], path, config: dict
) -> None:
    """Raise if `got` (from the checkpoint at `path`) does not fit a model whose state dict is
    `expected`, naming missing and unexpected keys and mismatched shapes."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(got))
        if got[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"checkpoint {path} does not fit this model (it was saved for another config):"]
    if shapes:
        lines.append(f"  {len(shapes)} shape mismatches: {_listing(shapes)}")
    if missing:
        lines.append(f"  {len(missing)} keys missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys: {_listing(unexpected)}")
    lines.append(f"  checkpoint config: {json.dumps(config, sort_keys=True)}")
    lines.append("  build the model from the checkpoint instead: UNet.load(path)")
    raise ValueError("\n".join(lines))
