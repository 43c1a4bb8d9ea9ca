"""What a benchmark run writes: the environment it ran in, a markdown table per section, the JSON
file and a bar plot per section."""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from harness import Probe, format_time

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # not installed, or broken next to this torch
        return None


def stable_fast_version() -> str | None:
    """stable-fast's version, saying whether it was built with its CUDA ops (its cuBLAS, cuDNN
    and CUTLASS kernels; a WITH_CUDA=0 build has only its TorchScript passes, CUDA graphs and
    Triton kernels), or None."""
    version = _version("sfast")
    if version is None or not torch.cuda.is_available():
        return version
    return version + ("" if hasattr(torch.ops.sfast, "cublas_lowp_addmm") else " (no CUDA ops)")


def environment(probe: Probe) -> dict:
    """Device, versions, commit and date: a figure without them is not a result. Where the tree
    is no git checkout (a copy of it on another machine), FASTDIFF_COMMIT names the commit; the
    tree is then not known to be clean ("dirty": None). "dirty": a change outside
    benchmarks/results/."""
    # the results folder is what this writes: files in it do not change what is measured
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    from fastdiff import _ext

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD") or os.environ.get("FASTDIFF_COMMIT"),
        "dirty": bool(status) if status is not None else None,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "device": {
            "type": probe.device,
            "name": probe.name,
            "slug": probe.slug,
            "copy_gbps": probe.copy_gbps,
            "matmul_tflops": probe.matmul_tflops,
            "cache_bytes": probe.cache_bytes,
            "threads": probe.threads,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": cudnn,
            "triton": _version("triton"),
            "diffusers": _version("diffusers"),
            "stable_fast": stable_fast_version(),
            "numpy": _version("numpy"),
            "fastdiff": _version("fastdiff"),
            "fastdiff_ext_ops": _ext.build_info()["ops"] if _ext.available() else None,
        },
    }


def stem(env: dict, quick: bool, only: list[str] | None) -> str:
    """File name stem: device slug, date, and what was run (a rerun the same day replaces it)."""
    parts = [env["device"]["slug"], env["date"][:10]]
    if quick:
        parts.append("quick")
    if only:
        parts += sorted(only)
    return "-".join(parts)


def _figure(row: dict) -> str:
    parts = []
    if "images_per_s" in row:
        parts.append(f"{row['images_per_s']:.3g} img/s, {format_time(row['s_per_image'])}/img")
    if "tflops" in row:
        parts.append(f"{row['tflops']:.3g} TFLOP/s")
    if "gbps" in row:
        parts.append(f"{row['gbps']:.3g} GB/s")
    return ", ".join(parts)


def markdown(name: str, title: str, section: dict, env: dict) -> str:
    dev = env["device"]
    peaks = ", ".join(f"{k} matmul {v:.3g} TFLOP/s" for k, v in dev["matmul_tflops"].items())
    lines = [
        f"### {name}: {title}",
        "",
        f"{dev['name']} ({dev['type']}, {dev['threads']} threads), copy {dev['copy_gbps']:.3g} "
        f"GB/s, {peaks}; {env['date']}, commit {(env['commit'] or '?')[:10]}",
        "",
    ]
    if section.get("skipped"):
        return "\n".join([*lines, f"skipped: {section['skipped']}", ""])
    if section.get("error"):
        return "\n".join([*lines, f"ERROR setting up the section: {section['error']}", ""])
    lines += [
        "| case | baseline | fastdiff | ratio | fastdiff figure | % roofline |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    missing = []
    for case in section["cases"]:
        unit, results = case["unit"], case["contenders"]
        for row in case["rows"]:
            f = results[row["fastdiff"]]
            pct = f.get("roofline_pct")
            lines.append(
                f"| {case['name']} | {row['baseline']} {format_time(row['baseline_s'])}/{unit} "
                f"| {row['fastdiff']} {format_time(row['fastdiff_s'])}/{unit} "
                f"| {row['ratio']:.3g}x | {_figure(f)} | {'' if pct is None else f'{pct:.1f}%'} |"
            )
        if not case["rows"]:
            times = {n: r["median_s"] for n, r in results.items() if "median_s" in r}
            timed = [f"{n} {format_time(s)}" for n, s in times.items()]
            lines.append(f"| {case['name']} | {', '.join(timed) or '-'} | - | - | | |")
        for n, r in results.items():
            if "skipped" in r or "error" in r:
                what = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR: {r['error']}"
                missing.append(f"- {case['name']} · {n}: {what}")
    lines += ["", *missing, *[f"- {n}" for n in section.get("notes", [])]]
    for case in section["cases"]:
        for who, p in case["profiles"].items():
            top = "; ".join(
                f"{e['name'][:48]} {e['self_us_per_step']:.0f} us" for e in p["top"][:5]
            )
            lines.append(
                f"- profile {case['name']} · {who}: {p['self_us_per_step']:.0f} us of "
                f"{p['what']} per step ({p['wall_us_per_step']:.0f} us wall); top: {top}"
            )
    return "\n".join([*lines, ""])


def plot(name: str, title: str, section: dict, env: dict, path: Path) -> str:
    """A bar per (case, fastdiff vs baseline): the speed-up. Returns what was done."""
    bars = [
        (f"{c['name']} · {r['fastdiff']} vs {r['baseline']}", r["ratio"])
        for c in section.get("cases", [])
        for r in c["rows"]
    ]
    if not bars:
        return "no plot: nothing was timed"
    wrapped = textwrap.fill(f"{name}: {title}", 110)
    heading = f"{wrapped}\n{env['device']['name']} · {env['date'][:10]}"
    try:
        import matplotlib
    except ImportError:
        matplotlib = None
    if matplotlib is not None:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter

        fig, ax = plt.subplots(figsize=(10, 0.8 + 0.32 * len(bars)))
        labels, ratios = zip(*bars)
        colors = ["tab:green" if r >= 1 else "tab:red" for r in ratios]
        ax.barh(range(len(bars)), ratios, color=colors)
        ax.set_yticks(range(len(bars)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        speedup = FuncFormatter(lambda v, _: f"{v:g}x")
        ax.xaxis.set_major_formatter(speedup)
        ax.xaxis.set_minor_formatter(speedup)
        ax.tick_params(axis="x", which="both", labelsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        for i, r in enumerate(ratios):
            ax.text(r, i, f" {r:.3g}x", va="center", fontsize=7)
        ax.set_xlabel("speed-up: baseline time / fastdiff time (log scale)")
        ax.set_title(heading, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")  # long case names widen the image
        plt.close(fig)
        return f"wrote {path}"
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return "no plot: neither matplotlib nor PIL is installed (pip install matplotlib)"
    width, row_h, left = 1000, 18, 520
    img = Image.new("RGB", (width, 50 + row_h * len(bars)), "white")
    draw = ImageDraw.Draw(img)
    draw.multiline_text((8, 4), heading, fill="black")
    top = max(r for _, r in bars)
    for i, (label, r) in enumerate(bars):
        y = 44 + i * row_h
        draw.text((8, y), label[:80], fill="black")
        length = int((width - left - 80) * r / top)
        draw.rectangle([left, y, left + length, y + row_h - 5], fill="green" if r >= 1 else "red")
        draw.text((left + length + 4, y), f"{r:.3g}x", fill="black")
    img.save(path)
    return f"wrote {path} (PIL: matplotlib is not installed)"
