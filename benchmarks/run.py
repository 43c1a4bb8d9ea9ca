"""Time fastdiff against its peers on this machine, in one process, and write the results.

    python benchmarks/run.py [--quick] [--only SECTION ...] [--device cpu|cuda] [--out DIR]
                             [--profile] [--threads N]

Prints one markdown table per section, and writes to --out (default benchmarks/results/) a JSON
file named after the device and the date (device name, versions, commit, every contender's raw
timings) and a PNG bar plot per section. Sections: see sections/__init__.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # before fastdiff defines any kernel
    print("run.py: ignoring TRITON_INTERPRET=1: interpreted kernels are not timed", file=sys.stderr)
    del os.environ["TRITON_INTERPRET"]

import report
import torch
from harness import FULL, QUICK, Context, Skip, probe, run_case
from sections import SECTIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, short timings")
    p.add_argument(
        "--only", nargs="+", choices=list(SECTIONS), metavar="SECTION", help=", ".join(SECTIONS)
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        help="torch.profiler summaries of sampling steps (default: on CUDA only)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(f"probing {device.type} (copy bandwidth, matmul peaks) ...", file=sys.stderr)
    dev = probe(device, args.quick)
    print(f"probed in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    env = report.environment(dev)
    ctx = Context(
        device,
        args.quick,
        dev,
        QUICK if args.quick else FULL,
        profile=device.type == "cuda" if args.profile is None else args.profile,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    name = report.stem(env, args.quick, args.only)
    result = {**env, "quick": args.quick, "sections": {}}
    path = args.out / f"{name}.json"

    def save() -> None:  # after every case: a run stopped part way keeps what it measured
        result["wall_s"] = time.perf_counter() - started
        path.write_text(json.dumps(result, indent=1) + "\n")

    errors = 0
    for section, module in SECTIONS.items():
        if args.only and section not in args.only:
            continue
        title = " ".join((module.__doc__ or section).strip().split("\n\n")[0].split())
        ctx.notes = list(getattr(module, "NOTES", ()))
        t0 = time.perf_counter()
        out: dict = {"title": title, "complete": False, "cases": []}
        result["sections"][section] = out
        try:
            cases = module.cases(ctx)
        except Skip as e:
            out["skipped"] = str(e)
            cases = []
        except Exception as e:  # a section that cannot set up must not cost the others
            out["error"] = f"{type(e).__name__}: {e}"
            print(f"[{section}] ERROR setting up: {out['error']}", file=sys.stderr)
            errors += 1
            cases = []
        for i, c in enumerate(cases):
            out["cases"].append(run_case(c, ctx, f"[{section} {i + 1}/{len(cases)}]"))
            out["notes"], out["wall_s"] = ctx.notes, time.perf_counter() - t0
            save()
        out["notes"], out["wall_s"], out["complete"] = ctx.notes, time.perf_counter() - t0, True
        errors += sum("error" in r for c in out["cases"] for r in c["contenders"].values())
        save()
        print(report.markdown(section, title, out, env), flush=True)
        png = args.out / f"{name}-{section}.png"
        print(report.plot(section, title, out, env, png), file=sys.stderr)
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if errors:
        print(f"{errors} contender(s) failed: see ERROR above", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
