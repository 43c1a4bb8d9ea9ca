"""FID / KID / IS of fastdiff's samplers on a diffusion model (default: the embedded digits model,
fastdiff.load()), against scikit-learn's 1797 digits, with the `digits` extractor. Prints a
Markdown table (the README's) and, with --json, writes every number.

    python scripts/fid_table.py                                  # the README table
    python scripts/fid_table.py --samplers dpmpp_2m --steps 10 --seeds 0 1 2 3 4 5 6 7 --num 256
                                                                 # the seed-to-seed spread

Samples are clamped to [-1, 1] (as saving them as images would) and cached in --cache, so an
interrupted run resumes. Sample i of a seed is the same image whatever the batch size.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import fastdiff
from fastdiff import data, metrics
from fastdiff.checkpoints import load
from fastdiff.metrics.base import extract_all

DEFAULT_SAMPLERS = list(fastdiff.SAMPLERS)


def draw(ckpt, sampler, steps, n, seed, *, backend=None, batch_size=256, cache=None):
    """n clamped samples, from the cache when there. `sampler` is a name, or NAME@SPACING for a
    spacing other than fastdiff.sample's default (e.g. heun@leading)."""
    key = f"{sampler}-{steps}-n{n}-seed{seed}-{backend or 'auto'}.npy"
    if cache is not None and (Path(cache) / key).is_file():
        return torch.from_numpy(np.load(Path(cache) / key))
    name, _, spacing = sampler.partition("@")
    options = {"spacing": spacing} if spacing else {}
    x = ckpt.sample(
        n, batch_size=batch_size, seed=seed, sampler=name, steps=steps, backend=backend, **options
    )
    x = x.clamp(-1, 1)
    if cache is not None:
        Path(cache).mkdir(parents=True, exist_ok=True)
        np.save(Path(cache) / key, x.numpy())
    return x


def scores(x, classifier, real_features) -> dict:
    """FID against the shipped digits statistics, KID against the digits' features, IS."""
    feats = extract_all(x, classifier)
    fid = metrics.fid(feats, "digits", extractor=classifier)
    kid = metrics.kid(feats, real_features, extractor=classifier, subset_size=min(len(x), 1000))
    isc = metrics.inception_score(x, extractor=classifier)
    return {"fid": fid.value, "kid": kid.value, "kid_std": kid.std, "is": isc.value}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model file/dir (default: the embedded one)")
    p.add_argument(
        "--samplers",
        nargs="*",
        default=DEFAULT_SAMPLERS,
        metavar="SAMPLER[@SPACING]",
        help="sampler names, optionally with a spacing (default: every sampler, trailing)",
    )
    p.add_argument("--steps", nargs="*", type=int, default=[10, 20, 50])
    p.add_argument(
        "--long",
        nargs="*",
        default=["ddpm:1000"],
        metavar="SAMPLER:STEPS",
        help="extra cells (default ddpm:1000, the 1000-step reference)",
    )
    p.add_argument("--num", type=int, default=500, help="samples per cell")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--cache", default="runs/fid_table_cache")
    p.add_argument("--json", default=None, help="write all numbers here")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    ckpt = load(args.model)
    classifier = metrics.get_extractor("digits")
    real = extract_all(data.digits(16), classifier)
    cells = [(s, k) for s in args.samplers for k in args.steps]
    cells += [(c.split(":")[0], int(c.split(":")[1])) for c in args.long]
    results = []
    for sampler, steps in cells:
        for seed in args.seeds:
            t0 = time.perf_counter()
            x = draw(ckpt, sampler, steps, args.num, seed, batch_size=args.batch_size,
                     cache=args.cache)  # fmt: skip
            row = {"sampler": sampler, "steps": steps, "seed": seed, "n": args.num}
            row |= scores(x, classifier, real)
            row["seconds"] = time.perf_counter() - t0
            results.append(row)
            print(json.dumps(row), flush=True)

    print()
    print(markdown(results, args))
    if len(args.seeds) > 1:
        for sampler, steps in cells:
            fids = [r["fid"] for r in results if (r["sampler"], r["steps"]) == (sampler, steps)]
            print(f"{sampler} {steps} steps: FID over seeds {args.seeds}: mean "
                  f"{np.mean(fids):.3f}, std {np.std(fids, ddof=1):.3f}")  # fmt: skip
    if args.json:
        meta = {
            "model": str(ckpt.path),
            "date": date.today().isoformat(),
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "extractor": classifier.name,
            "reference": "digits (scikit-learn, 1797 images)",
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


def markdown(results: list[dict], args) -> str:
    """One row per sampler, one column per step count; cells 'FID / KID / IS' (mean over seeds)."""
    steps = sorted({r["steps"] for r in results})
    samplers = list(dict.fromkeys(r["sampler"] for r in results))
    lines = [
        f"| sampler | {' | '.join(f'{k} steps' for k in steps)} |",
        "| --- |" + " --- |" * len(steps),
    ]
    for s in samplers:
        cells = []
        for k in steps:
            rows = [r for r in results if (r["sampler"], r["steps"]) == (s, k)]
            if rows:
                fid, kid, isc = (np.mean([r[m] for r in rows]) for m in ("fid", "kid", "is"))
                cells.append(f"{fid:.2f} / {kid:.2f} / {isc:.2f}")
            else:
                cells.append("")
        lines.append(f"| {s} | {' | '.join(cells)} |")
    n, seeds = args.num, args.seeds
    lines.append("")
    lines.append(
        f"FID / KID / IS with the `digits` extractor, {n} samples per cell (seed"
        f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}) against scikit-learn's "
        "1797 digits; lower FID and KID are better, IS is at most 10."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
