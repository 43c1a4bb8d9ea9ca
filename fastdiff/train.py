"""The reference training pipeline: the simple diffusion loss (Ho et al. 2020) for eps, x0 or v
prediction (Salimans & Ho 2022), optional min-SNR-gamma weighting (Hang et al. 2023), AdamW with
linear warmup, gradient clipping, EMA weights, autocast, DDP through torchrun, atomic checkpoints
and exact resume.

Everything random in a step (which images, which timesteps, which noise) is drawn from
generators seeded by (seed, step), for the whole global batch; each process takes its slice. So
a run resumed at step k, and a run split over processes, see the batches an uninterrupted single
process sees.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastdiff import checkpoints, data
from fastdiff.models import PRESETS, UNet
from fastdiff.parameterization import canonical, targets
from fastdiff.sample import sample
from fastdiff.samplers import SAMPLERS
from fastdiff.schedules import BETA_SCHEDULES, Schedule

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LOG = "log.jsonl"
INIT_STREAM, DROPOUT_STREAM = 2, 3  # random streams beside data.DATA_STREAM and NOISE_STREAM


@dataclass
class TrainConfig:
    """A training run. `model` overrides fields of the UNet preset (see UNetConfig)."""

    data: str = "digits"  # "digits", an image folder or a .npy/.npz file
    out: str = "runs/digits"  # run directory: checkpoints/, samples/, log.jsonl
    image_size: int | None = None  # image folders: resize to this (default 64); digits: 16
    channels: int = 3  # image folders: 1 (grey) or 3 (RGB)
    preset: str = "digits"
    model: dict = field(default_factory=dict)
    prediction: str = "v"
    schedule: str = "cosine"
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None
    steps: int = 4000
    batch_size: int = 64  # global: split across processes
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 100
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    precision: str = "fp32"
    seed: int = 0
    save_every: int = 500
    keep: int = 2
    sample_every: int = 1000
    sampler: str = "dpmpp_2m"  # for the sample grids, and stored as the model's default
    sample_steps: int = 20
    num_samples: int = 64
    device: str | None = None  # default: cuda if available, else cpu
    export: str | None = None  # at the end, write the EMA weights as a half-precision file

    def problems(self) -> list[str]:
        out = []
        positive = ("timesteps", "steps", "batch_size", "save_every", "keep", "num_samples")
        out += [
            f"{n} must be >= 1, got {getattr(self, n)}" for n in positive if getattr(self, n) < 1
        ]
        for name in ("warmup", "sample_every", "seed"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.preset not in PRESETS:
            out.append(f"unknown preset {self.preset!r}; presets: {sorted(PRESETS)}")
        try:
            canonical(self.prediction)
        except ValueError as e:
            out.append(str(e))
        if self.schedule not in BETA_SCHEDULES:
            out.append(f"unknown schedule {self.schedule!r}; valid: {list(BETA_SCHEDULES)}")
        if self.precision not in PRECISIONS:
            out.append(f"unknown precision {self.precision!r}; valid: {list(PRECISIONS)}")
        if self.sampler not in SAMPLERS:
            out.append(f"unknown sampler {self.sampler!r}; valid: {sorted(SAMPLERS)}")
        if not self.lr > 0:
            out.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            out.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            out.append(f"grad_clip must be > 0 (or None for no clipping), got {self.grad_clip}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            out.append(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        return out

    def schedule_object(self) -> Schedule:
        return Schedule.from_betas(
            self.schedule,
            self.timesteps,
            self.beta_start,
            self.beta_end,
            zero_terminal_snr=self.zero_terminal_snr,
        )


# Settings that may change when a run is resumed; the others define the run.
RESUMABLE = (
    "steps",
    "out",
    "save_every",
    "keep",
    "sample_every",
    "num_samples",
    "device",
    "export",
)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): weight the x0 error by min(snr, gamma), expressed for
    a loss on the model's own target (eps error = snr * x0 error, v error = (1 + snr) * x0)."""
    w = snr.clamp(max=gamma)
    return {"eps": w / snr, "x0": w, "v": w / (snr + 1)}[canonical(prediction)]


def diffusion_loss(
    model: nn.Module,
    x0: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """The simple loss: mean over the batch of |model(x_t, t) - target|^2 (mean over pixels)."""
    abar = alphas_cumprod[t].view(-1, *[1] * (x0.ndim - 1))  # float64, (B, 1, 1, 1)
    alpha, sigma = abar.sqrt().to(x0.dtype), (1 - abar).sqrt().to(x0.dtype)
    x_t = alpha * x0 + sigma * eps
    y = model(x_t, t.to(x0.dtype))
    per_sample = (y.float() - targets(prediction, x0, eps, alpha, sigma)).square()
    per_sample = per_sample.flatten(1).mean(1)
    if min_snr_gamma is not None:
        snr = (abar / (1 - abar)).flatten()
        per_sample = per_sample * min_snr_weight(snr, min_snr_gamma, prediction).to(x0.dtype)
    return per_sample.mean()


class EMA:
    """Exponential moving average of a model's weights, decay warmed up as min(d, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        ema = list(self.model.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # train() created the process group, so it destroys it

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    """Join the process group torchrun set up (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Dist()
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    return _Dist(rank, dist.get_world_size(), local_rank, owns)


def _device(cfg: TrainConfig) -> torch.device:
    name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for but CUDA is not available here")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


# -- checkpoints ----------------------------------------------------------------------------------


def _rng_states(device: torch.device, ddp: _Dist) -> list[dict[str, torch.Tensor]]:
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if ddp.world == 1:
        return [mine]
    gathered: list = [None] * ddp.world
    dist.all_gather_object(gathered, mine)
    return gathered


def save_checkpoint(
    run_dir: Path, step: int, *, model, ema, opt, scaler, cfg, schedule, shape, device, ddp
) -> Path | None:
    """Rank 0 writes checkpoints/step-N (see checkpoints.save_training_checkpoint)."""
    rngs = _rng_states(device, ddp)  # every rank takes part
    if not ddp.main:
        return None
    info = checkpoints.diffusion_info(
        schedule,
        cfg.prediction,
        shape,
        cfg.sampler,
        cfg.sample_steps,
        trained={"data": cfg.data, "step": step},
    )
    return checkpoints.save_training_checkpoint(
        run_dir,
        step,
        model=model,
        ema_model=ema.model,
        optimizer=opt,
        scaler=scaler,
        rng_states=rngs,
        diffusion=info,
        config=dataclasses.asdict(cfg),
        keep=cfg.keep,
    )


def read_run_config(run_dir: str | Path) -> tuple[TrainConfig, Path]:
    """The config of a run's latest checkpoint, and that checkpoint."""
    latest = checkpoints.latest_checkpoint(run_dir)
    if latest is None:
        raise FileNotFoundError(f"nothing to resume: {run_dir} has no checkpoints/step-N directory")
    meta = json.loads((latest / checkpoints.TRAIN_JSON).read_text())
    return TrainConfig(**meta["config"]), latest


def resume_config(run_dir: str | Path, **overrides) -> TrainConfig:
    """The config to continue the run in `run_dir`, with RESUMABLE settings overridden."""
    cfg, _ = read_run_config(run_dir)
    fixed = sorted(k for k, v in overrides.items() if k not in RESUMABLE and getattr(cfg, k) != v)
    if fixed:
        raise ValueError(
            f"cannot change {', '.join(fixed)} when resuming {run_dir}: a resumed run keeps its "
            f"settings (only {', '.join(RESUMABLE)} may change); start a new run with another out"
        )
    return dataclasses.replace(cfg, **overrides, out=str(run_dir))


def _restore(latest: Path, *, model, ema, opt, scaler, device, ddp) -> int:
    meta, rng = checkpoints.load_training_state(
        latest, model=model, ema_model=ema.model, optimizer=opt, scaler=scaler
    )
    if len(rng) == ddp.world:
        torch.set_rng_state(rng[ddp.rank]["cpu"])
        if device.type == "cuda" and "cuda" in rng[ddp.rank]:
            torch.cuda.set_rng_state(rng[ddp.rank]["cuda"], device)
    elif ddp.main:
        print(
            f"note: {latest} was written by {len(rng)} processes, resuming with {ddp.world}: "
            "the global RNG (dropout) is reseeded; data and noise are unaffected",
            file=sys.stderr,
        )
    return int(meta["step"])


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)


# -- the loop -------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    schedule: Schedule | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train (or, with `resume`, continue) the run `cfg` describes; returns the directory of the
    final checkpoint. `schedule` replaces the named beta schedule of `cfg` for a new run (a
    resumed run uses the one stored in its checkpoint). Under torchrun every process calls this."""
    problems = cfg.problems()
    if problems:
        raise ValueError("invalid training config: " + "; ".join(problems))
    run_dir = Path(cfg.out)
    latest = checkpoints.latest_checkpoint(run_dir)
    if resume and latest is None:
        raise FileNotFoundError(f"nothing to resume: {run_dir} has no checkpoints/step-N directory")
    if not resume and latest is not None:
        raise FileExistsError(
            f"{run_dir} already holds a run (checkpoint {latest.name}): resume it with --resume "
            "or pick another output directory"
        )
    device = _device(cfg)
    ddp = _init_distributed(device)
    if cfg.batch_size % ddp.world:
        raise ValueError(
            f"batch_size {cfg.batch_size} (global) is not divisible by {ddp.world} processes"
        )
    if resume:
        info = json.loads((latest / checkpoints.DIFFUSION).read_text())
        schedule = checkpoints.schedule_from_dict(info["schedule"])
    elif schedule is None:
        schedule = cfg.schedule_object()

    images = data.load_dataset(cfg.data, cfg.image_size, cfg.channels)
    shape = tuple(images.shape[1:])
    torch.manual_seed(data.stream_seed(cfg.seed, INIT_STREAM, 0))  # the same on every rank
    overrides = {"sample_size": shape[-1], "in_channels": shape[0], "out_channels": shape[0]}
    model = UNet.from_preset(cfg.preset, **(overrides | cfg.model))
    torch.manual_seed(data.stream_seed(cfg.seed, DROPOUT_STREAM, ddp.rank))
    _check_shape(model, shape, cfg)
    model = model.to(device)
    ema = EMA(model, cfg.ema_decay)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    start = 0
    if resume:
        start = _restore(
            latest, model=model, ema=ema, opt=opt, scaler=scaler, device=device, ddp=ddp
        )
    net = nn.parallel.DistributedDataParallel(model) if ddp.world > 1 else model
    if ddp.main:
        _truncate_log(run_dir / LOG, start)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"training a {n_params / 1e6:.2f}M-parameter UNet ({cfg.prediction} prediction, "
            f"{schedule}) on {cfg.data}: {len(images)} images {'x'.join(map(str, shape))}, "
            f"batch {cfg.batch_size} over {ddp.world} process(es) on {device}; "
            f"steps {start} -> {cfg.steps}; run directory {run_dir}",
            file=sys.stderr,
        )
    images = images.to(device)
    abar = schedule.alphas_cumprod.to(device)
    T, B, b = schedule.num_train_timesteps, cfg.batch_size, cfg.batch_size // ddp.world
    mine = slice(ddp.rank * b, (ddp.rank + 1) * b)
    autocast_dtype = PRECISIONS[cfg.precision]
    final = latest if resume else None

    bar = None
    if progress and ddp.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / LOG, "a", buffering=1) if ddp.main else None  # line-buffered
    try:
        t_start = t_last = time.perf_counter()
        for step in range(start, cfg.steps):
            net.train()
            idx = data.batch_indices(len(images), B, step, cfg.seed)[mine]
            g = torch.Generator(device).manual_seed(
                data.stream_seed(cfg.seed, data.NOISE_STREAM, step)
            )
            t = torch.randint(T, (B,), generator=g, device=device)[mine]
            eps = torch.randn((B, *shape), generator=g, device=device)[mine]
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, autocast_dtype, enabled=autocast_dtype is not None):
                loss = diffusion_loss(
                    net, images[idx], t, eps, abar, cfg.prediction, cfg.min_snr_gamma
                )
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            ema.update(model, step)

            loss = loss.detach()
            if ddp.world > 1:
                dist.all_reduce(loss)  # a sum: gloo has no average
                loss /= ddp.world
            now = time.perf_counter()
            if ddp.main:
                rec = {
                    "step": step + 1,
                    "loss": loss.item(),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "images_per_s": B / (now - t_last),
                    "elapsed_s": round(now - t_start, 3),
                }
                log.write(json.dumps(rec) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}")
                    bar.update(1)
            n = step + 1
            if n % cfg.save_every == 0 or n == cfg.steps:
                final = save_checkpoint(
                    run_dir,
                    n,
                    model=model,
                    ema=ema,
                    opt=opt,
                    scaler=scaler,
                    cfg=cfg,
                    schedule=schedule,
                    shape=shape,
                    device=device,
                    ddp=ddp,
                )
            if ddp.main and cfg.sample_every and n % cfg.sample_every == 0:
                grid = save_samples(
                    ema.model,
                    run_dir / "samples" / f"step-{n:07d}.png",
                    cfg,
                    schedule,
                    shape,
                    device,
                )
                if bar is not None:
                    bar.write(f"step {n}: samples in {grid}")
            t_last = time.perf_counter()  # throughput counts training, not saving or sampling
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    if ddp.world > 1:
        final_path = [str(final) if final else None]
        dist.broadcast_object_list(final_path)
        final = Path(final_path[0])
        if ddp.owns_group:
            # Tear the group down while Python is alive. A gloo worker thread that releases a
            # finished collective's tensors during interpreter shutdown needs the GIL, is ended
            # by pthread_exit and aborts the process ("terminate called without an active
            # exception", pytorch/pytorch#190489). DDP's reducer holds the group: drop it first,
            # so that destroying the group joins its worker threads now.
            del net
            gc.collect()
            dist.destroy_process_group()
    if cfg.export and ddp.main:
        checkpoints.export_model(final, cfg.export)
    return final


def _check_shape(model: UNet, shape: tuple[int, ...], cfg: TrainConfig) -> None:
    factor = 2 ** (model.config.levels - 1)
    if shape[-1] % factor or shape[-2] % factor:
        raise ValueError(
            f"{cfg.data} has {shape[-2]}x{shape[-1]} images but this UNet "
            f"({model.config.levels} levels) needs sides divisible by {factor}; resize the "
            "data (image_size) or use fewer levels"
        )


@torch.no_grad()
def save_samples(model, path, cfg: TrainConfig, schedule, shape, device) -> Path:
    x = sample(
        model,
        (cfg.num_samples, *shape),
        schedule=schedule,
        prediction=cfg.prediction,
        sampler=cfg.sampler,
        steps=cfg.sample_steps,
        seed=0,
        device=device,
    )
    return data.save_grid(x, path)
