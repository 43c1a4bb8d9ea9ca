"""The `fastdiff` command line: `fastdiff sample` and `fastdiff train` (also `python -m fastdiff`).

A user error (bad flag value, missing file, unknown sampler) prints one line and exits with
status 2; the run itself failing (bad data, a backend that cannot run) exits with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

PROG = "fastdiff"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: 'fastdiff sample: error: ...'."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        return v

    parse.__name__ = "integer"
    return parse


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _unit_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _optional_positive_float(s: str) -> float | None:
    return None if s.lower() in ("none", "off") else _positive_float(s)


def _seed(s: str) -> int:
    v = _int_at_least(0)(s)
    if v >= 2**63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {v}")
    return v


def _device(s: str) -> str:
    import torch

    try:
        device = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {s!r} (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{s!r} asked for, but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {s!r}: use cpu or cuda[:index]")
    return s


def _json_object(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {s!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object like '{{\"channels\": [32, 64]}}', got {s!r}"
        )
    return v


# -- sample ---------------------------------------------------------------------------------------


def _add_sample(sub) -> None:
    from fastdiff.samplers import SAMPLERS

    p = sub.add_parser(
        "sample",
        help="draw samples from a model and write a PNG grid",
        description=(
            "Draw samples from a diffusion model (default: the digits model shipped with "
            "fastdiff) and write them as a PNG grid (and optionally an .npz of the "
            "samples). Prints the time per step and images per second."
        ),
    )
    p.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="a .safetensors model file, a checkpoint directory or a training run directory "
        "(its latest checkpoint); default: the shipped digits model",
    )
    p.add_argument(
        "--sampler",
        choices=sorted(SAMPLERS),
        default=None,
        help="sampling algorithm (default: the model's own, dpmpp_2m for the shipped model)",
    )
    p.add_argument(
        "--steps",
        type=_int_at_least(1),
        default=None,
        help="number of sampler steps (default: the model's own, 20 for the shipped model)",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="random seed; sample i depends only on it and i (default: 0)",
    )
    p.add_argument(
        "-n", "--num", type=_int_at_least(1), default=64, help="number of images (default: 64)"
    )
    p.add_argument(
        "--batch-size", type=_int_at_least(1), default=None, help="images per batch (default: all)"
    )
    p.add_argument(
        "--backend",
        default=None,
        help="backend of the sampler-step op (e.g. reference, cpu, triton, cuda; default: the "
        "fastest that can run)",
    )
    p.add_argument(
        "--device", type=_device, default=None, help="cpu or cuda[:i] (default: cuda if available)"
    )
    p.add_argument(
        "--out",
        metavar="PNG",
        default="samples.png",
        help="where to write the grid (default: samples.png)",
    )
    p.add_argument(
        "--npz",
        metavar="PATH",
        default=None,
        help="also save the samples, unquantised float32 clamped to [-1, 1], as 'samples' in "
        "this .npz (readable by fastdiff train --data and the metrics)",
    )
    p.add_argument(
        "--nrow", type=_int_at_least(1), default=None, help="images per grid row (default: square)"
    )
    p.add_argument(
        "--scale",
        type=_int_at_least(1),
        default=None,
        help="enlarge each image this many times in the grid (default: to at least 48 pixels)",
    )
    p.set_defaults(run=_run_sample)


def _run_sample(args) -> int:
    import numpy as np
    import torch

    from fastdiff import checkpoints, data

    if args.backend is not None:
        from fastdiff.ops.step import step_op

        step_op.get(args.backend)  # raises naming the valid backends
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {args.out}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = checkpoints.load(args.model, device=device)
    if torch.device(device).type == "cpu":
        # oneDNN's convolutions run NHWC natively: the shipped model samples 1.3x faster on the
        # AMD EPYC machine (2 threads, 2026-12-01) with channels_last weights; the samples are
        # the same to rounding
        ckpt.model.to(memory_format=torch.channels_last)
    sampler = args.sampler or ckpt.default_sampler
    steps = args.steps if args.steps is not None else ckpt.default_steps
    batch = min(args.batch_size or args.num, args.num)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    x = ckpt.sample(
        args.num,
        batch_size=batch,
        seed=args.seed,
        sampler=sampler,
        steps=steps,
        backend=args.backend,
        device=device,
    )
    sync()
    seconds = time.perf_counter() - t0
    batches = -(-args.num // batch)
    name = "the default model" if args.model is None else str(ckpt.path)
    shape = "x".join(map(str, ckpt.sample_shape))
    print(
        f"sampled {args.num} images ({shape}) from {name} with {sampler}, {steps} steps, on "
        f"{device}: {seconds:.2f} s, {1000 * seconds / (steps * batches):.1f} ms per step "
        f"(batch of {batch}), {args.num / seconds:.1f} images/s"
    )
    data.save_grid(x, out, args.nrow, args.scale)
    print(f"wrote {out}")
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, samples=x.clamp(-1, 1).cpu().numpy())
        print(f"wrote {args.npz} (samples: {tuple(x.shape)} float32, clamped to [-1, 1])")
    return 0


# -- train ----------------------------------------------------------------------------------------

# flag -> (TrainConfig field, type, help)
_TRAIN_FLAGS = {
    "--data": (
        str,
        "'digits' (sklearn's 8x8 digits at 16x16), a folder of PNG/JPEG images, "
        "or a .npy/.npz array (uint8 or floats in [-1, 1])",
    ),
    "--out": (str, "run directory: checkpoints/step-N, samples/*.png, log.jsonl"),
    "--image-size": (
        _int_at_least(1),
        "image folders: resize and center-crop to this side "
        "(default 64); digits: upsample to it (default 16)",
    ),
    "--channels": (_int_at_least(1), "image folders: 1 (grey) or 3 (RGB)"),
    "--preset": (str, "UNet preset (fastdiff.models.PRESETS)"),
    "--model": (
        _json_object,
        "UNetConfig fields overriding the preset, as JSON, e.g. '{\"channels\": [32, 64, 64]}'",
    ),
    "--prediction": (str, "what the network predicts: eps, x0 or v"),
    "--schedule": (str, "beta schedule: linear, scaled_linear, cosine or sigmoid"),
    "--timesteps": (_int_at_least(2), "number of training timesteps T"),
    "--beta-start": (_positive_float, "first beta (linear, scaled_linear, sigmoid)"),
    "--beta-end": (_positive_float, "last beta (linear, scaled_linear, sigmoid)"),
    "--zero-terminal-snr": (None, "rescale the schedule to zero SNR at t = T-1 (use v or x0)"),
    "--min-snr-gamma": (
        _optional_positive_float,
        "min-SNR-gamma loss weighting (e.g. 5); 'none' for the plain loss",
    ),
    "--steps": (_int_at_least(1), "total optimizer steps (a resumed run continues to this)"),
    "--batch-size": (_int_at_least(1), "global batch size, split across torchrun processes"),
    "--lr": (_positive_float, "AdamW learning rate after warmup"),
    "--weight-decay": (_float, "AdamW weight decay"),
    "--warmup": (_int_at_least(0), "linear learning-rate warmup steps"),
    "--grad-clip": (_optional_positive_float, "clip the gradient norm to this; 'none' to not clip"),
    "--ema-decay": (
        _unit_float,
        "decay of the EMA weights (the weights a checkpoint samples with)",
    ),
    "--precision": (str, "autocast precision: fp32, bf16 or fp16 (fp16 with loss scaling)"),
    "--seed": (_seed, "seed of the initial weights, batches, timesteps and noise"),
    "--save-every": (_int_at_least(1), "write a checkpoint every this many steps (and at the end)"),
    "--keep": (_int_at_least(1), "number of most recent checkpoints to keep"),
    "--sample-every": (
        _int_at_least(0),
        "write a grid of EMA samples every this many steps (0: never)",
    ),
    "--sampler": (str, "sampler for the grids, stored as the model's default sampler"),
    "--sample-steps": (
        _int_at_least(1),
        "sampler steps for the grids, stored as the model's default",
    ),
    "--num-samples": (_int_at_least(1), "images in each sample grid"),
    "--device": (
        _device,
        "cpu or cuda[:i] (default: cuda if available; under torchrun cuda:LOCAL_RANK)",
    ),
    "--export": (
        str,
        "at the end, also write the EMA weights as one half-precision .safetensors "
        "model file (with a .json copy of its config) at this path",
    ),
}


def _add_train(sub) -> None:
    from fastdiff.train import TrainConfig

    defaults = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a UNet on a dataset (DDP: torchrun --nproc_per_node N -m fastdiff train ...)",
        description=(
            "Train a UNet diffusion model with the simple loss. Checkpoints (EMA weights, raw "
            "weights, optimizer, step, RNG state, JSON config) are written atomically to "
            "OUT/checkpoints/step-N; --resume continues a run exactly. For data-parallel "
            "training launch it with torchrun, e.g. torchrun --nproc_per_node 2 -m fastdiff "
            "train ...; --batch-size is then the global batch."
        ),
    )
    for flag, (kind, text) in _TRAIN_FLAGS.items():
        name = flag[2:].replace("-", "_")
        default = getattr(defaults, name)
        shown = "" if default is None else f" (default: {json.dumps(default)})"
        if kind is None:
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            metavar = name.upper()
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=metavar,
                           help=text + shown)  # fmt: skip
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint with its own settings (only "
        "--steps, --save-every, --keep, --sample-every, --num-samples, --device and --export "
        "may change)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar with the loss and images/s",
    )
    p.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from fastdiff.train import TrainConfig, resume_config, train

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(args, f.name)
    }
    if args.resume:
        cfg = resume_config(given.pop("out", TrainConfig.out), **given)
    else:
        cfg = TrainConfig(**given)
    final = train(cfg, resume=args.resume, progress=args.progress)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"checkpoint: {final}")
        if cfg.export:
            print(f"exported: {cfg.export}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


# -- main -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from fastdiff import __version__

    parser = _Parser(
        prog=PROG,
        description="fastdiff: a compiled, high-performance sampler for diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_sample(sub)
    _add_train(sub)
    from fastdiff.export.cli import add_export_parser
    from fastdiff.metrics.cli import add_fid_parser

    add_fid_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from fastdiff.data import DataError

    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except (DataError, ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1
