"""Diffusion model checkpoints and `fastdiff.load`.

A model file is a .safetensors file of UNet weights whose metadata holds the UNet config
("config", as fastdiff.models.checkpoint writes it) and how the model diffuses ("diffusion":
prediction, schedule betas, sample shape, default sampler and steps). A checkpoint directory
written by training (checkpoints/step-N of a run) holds that file as model.safetensors (the EMA
weights) next to config.json and diffusion.json, and the training state: train.safetensors (raw
weights, optimizer tensors, each process's RNG state) and train.json (step, training config,
optimizer hyperparameters, loss scaler). Directories are written under a
temporary name and renamed into place, so a killed writer never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastdiff.models import UNet, UNetConfig
from fastdiff.models import checkpoint as model_checkpoint
from fastdiff.parameterization import canonical
from fastdiff.sample import sample as _sample
from fastdiff.schedules import Schedule

ASSETS = Path(__file__).parent / "assets"
DEFAULT_MODEL = ASSETS / "digits.safetensors"
MODEL, DIFFUSION = model_checkpoint.WEIGHTS, "diffusion.json"
TRAIN_STATE, TRAIN_JSON = "train.safetensors", "train.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def schedule_to_dict(schedule: Schedule) -> dict:
    # repr of a Python float round-trips exactly, so the betas survive JSON bit for bit
    return {"name": schedule.name, "betas": schedule.betas.tolist()}


def schedule_from_dict(d: dict) -> Schedule:
    return Schedule(torch.tensor(d["betas"], dtype=torch.float64), d.get("name", "custom"))


def diffusion_info(
    schedule: Schedule,
    prediction: str,
    sample_shape: tuple[int, ...],
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    **extra: Any,
) -> dict:
    """What besides the network a sampler needs, as stored next to the weights."""
    return {
        "prediction": canonical(prediction),
        "schedule": schedule_to_dict(schedule),
        "sample_shape": list(sample_shape),
        "sampler": sampler,
        "steps": steps,
        **extra,
    }


def save_model_file(
    path: str | Path, state: dict[str, torch.Tensor], config: dict, diffusion: dict
) -> Path:
    """Write weights with the UNet config and diffusion info in the metadata (readable by
    fastdiff.models.checkpoint.load and UNet.load as well as by `load`)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {
        "format": model_checkpoint.FORMAT,
        "config": json.dumps(config, sort_keys=True),
        "diffusion": json.dumps(diffusion, sort_keys=True),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_dir_atomically(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on an empty temporary directory next to `final`, flush it to disk, then
    rename it to `final` (replacing an existing one). Until the rename, `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a training run: [(step, directory)] in step order."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = step_dirs(run_dir)
    return dirs[-1][1] if dirs else None


def export_model(
    checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Write the (EMA) weights of a checkpoint as one model file in `dtype`, with a readable
    copy of its config and diffusion info next to it (`out` with .json). This is how
    fastdiff/assets/digits.safetensors was made."""
    file = _model_file(Path(checkpoint))
    config, state = model_checkpoint.load(file)
    diffusion = _diffusion(file)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_model_file(tmp, state, config, diffusion)
    os.chmod(tmp, 0o644)  # a file to ship, not a private one
    os.replace(tmp, out)
    write_json(out.with_suffix(".json"), {"config": config, "diffusion": diffusion})
    return out


# -- training checkpoints -----------------------------------------------------------------------


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, other = {}, {}
    for i, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{i}.{k}"] = v
            else:
                other.setdefault(str(i), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": other}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["state"].items()}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        state.setdefault(int(i), {})[k] = v
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_training_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    ema_model: UNet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    rng_states: list[dict[str, torch.Tensor]],
    diffusion: dict,
    config: dict,
    keep: int,
) -> Path:
    """Write run_dir/checkpoints/step-N atomically, then delete all but the last `keep`.
    `rng_states` has one {"cpu": ..., "cuda": ...} per process, in rank order."""
    model_config = ema_model.config.to_dict()
    optim_tensors, optim_meta = _optimizer_split(optimizer)
    state = {f"model.{k}": v for k, v in model.state_dict().items()} | optim_tensors
    for rank, r in enumerate(rng_states):
        state |= {f"rng.{kind}.{rank}": t for kind, t in r.items()}
    meta = {
        "step": step,
        "config": config,
        "optimizer": optim_meta,
        "scaler": scaler.state_dict(),
        "world_size": len(rng_states),
    }

    def write(tmp: Path) -> None:
        save_model_file(tmp / MODEL, ema_model.state_dict(), model_config, diffusion)
        write_json(tmp / model_checkpoint.CONFIG, model_config)
        write_json(tmp / DIFFUSION, diffusion)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / TRAIN_STATE))
        write_json(tmp / TRAIN_JSON, meta)

    final = write_dir_atomically(Path(run_dir) / "checkpoints" / f"step-{step:07d}", write)
    for _, old in step_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(
    checkpoint: Path,
    *,
    model: torch.nn.Module,
    ema_model: UNet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """Load a training checkpoint into the given objects; returns (train.json, RNG states)."""
    meta = json.loads((checkpoint / TRAIN_JSON).read_text())
    state = load_file(str(checkpoint / TRAIN_STATE))
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    _, ema_state = model_checkpoint.load(checkpoint / MODEL)
    ema_model.load_state_dict(ema_state)
    optim = {k: v for k, v in state.items() if k.startswith("optim.")}
    optimizer.load_state_dict(_optimizer_join(optim, meta["optimizer"]))
    scaler.load_state_dict(meta["scaler"])
    rng = [
        {
            kind: state[f"rng.{kind}.{rank}"]
            for kind in ("cpu", "cuda")
            if f"rng.{kind}.{rank}" in state
        }
        for rank in range(meta["world_size"])
    ]
    return meta, rng


@dataclass
class Checkpoint:
    """A loaded diffusion model: `model` is a valid `model` for fastdiff.sample."""

    model: UNet
    schedule: Schedule
    prediction: str
    sample_shape: tuple[int, ...]
    path: Path
    info: dict = field(default_factory=dict)

    @property
    def default_sampler(self) -> str:
        return self.info.get("sampler", "dpmpp_2m")

    @property
    def default_steps(self) -> int:
        return int(self.info.get("steps", 20))

    @torch.no_grad()
    def sample(
        self, n: int, *, batch_size: int | None = None, seed: int = 0, **kwargs: Any
    ) -> torch.Tensor:
        """n samples (n, *sample_shape) through fastdiff.sample with this model's schedule and
        prediction (and its default sampler and steps unless given), `batch_size` at a time.
        Sample i is the same whatever the batch size."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        kwargs.setdefault("sampler", self.default_sampler)
        kwargs.setdefault("steps", self.default_steps)
        batch_size = batch_size or n
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            out.append(
                _sample(
                    self.model,
                    (b, *self.sample_shape),
                    schedule=self.schedule,
                    prediction=self.prediction,
                    seed=seed,
                    sample_offset=start,
                    **kwargs,
                )
            )
        return torch.cat(out)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return (
            f"Checkpoint({self.path}, {n / 1e6:.2f}M parameters, prediction={self.prediction}, "
            f"{self.schedule}, sample_shape={self.sample_shape})"
        )


def _model_file(path: Path) -> Path:
    """The model file of a model file, checkpoint directory or training run directory."""
    if path.is_file():
        return path
    if path.is_dir():
        if (path / MODEL).is_file():
            return path / MODEL
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest / MODEL
        raise FileNotFoundError(
            f"{path} is not a fastdiff checkpoint: expected {MODEL} in it, or checkpoints/step-N "
            "directories (a training run directory)"
        )
    raise FileNotFoundError(f"no model at {path}: no such file or directory")


def load(
    path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Checkpoint:
    """Load a diffusion model: a .safetensors model file, a checkpoint directory, or a training
    run directory (its latest checkpoint); None loads the default model shipped with fastdiff
    (a UNet trained on 16x16 digits). The model is in eval mode on `device` in `dtype`."""
    file = _model_file(Path(path) if path is not None else DEFAULT_MODEL)
    config, state = model_checkpoint.load(file, device="cpu")
    diffusion = _diffusion(file)
    model = UNet(UNetConfig.from_dict(config))
    model_checkpoint.check_state_dict(model.state_dict(), state, file, config)
    model.load_state_dict(state)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Checkpoint(
        model=model,
        schedule=schedule_from_dict(diffusion["schedule"]),
        prediction=canonical(diffusion["prediction"]),
        sample_shape=tuple(diffusion["sample_shape"]),
        path=file,
        info=diffusion,
    )


def _diffusion(file: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        text = (f.metadata() or {}).get("diffusion")
    if text is None and (file.parent / DIFFUSION).is_file():
        text = (file.parent / DIFFUSION).read_text()
    if text is None:
        raise ValueError(
            f"{file} has the weights of a UNet but no diffusion info (prediction, schedule, "
            f"sample shape): neither {DIFFUSION} next to it nor 'diffusion' in its metadata; "
            "load the network alone with fastdiff.models.UNet.load"
        )
    return json.loads(text)
