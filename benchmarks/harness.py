"""The timing core every benchmark section shares.

A section is a module of benchmarks/sections/, listed in `sections.SECTIONS`, with

    def cases(ctx: Context) -> list[Case]    # raise Skip("why") to skip the whole section
    NOTES: tuple[str, ...] = ()              # optional: formulas and caveats printed with its table

A Case is one workload (a shape, a model, a sampler); its Contenders are the implementations timed
on it, each built lazily by `setup()` (which may raise Skip) and returning the call to time.
Baselines (diffusers, torch, the reference) and fastdiff contenders are timed in the same
process; every fastdiff contender is reported against the baselines as baseline time / its time.

Timing: one cold call, warm-up calls, a calibration (enough calls per batch for a batch to last
`min_sample_s`, from the best of three single calls), then `repeats` batches timed with CUDA
events (CUDA) or synchronize + perf_counter (CPU); the figure is the median over batches of the
time per operation. Inputs that caches would flatter rotate through enough copies to exceed
twice the last-level cache (`Context.rotations`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


class Skip(Exception):
    """Raised by a section or a contender's setup: it cannot run here, for the given reason."""


def first_line(error: BaseException, limit: int = 240) -> str:
    """An exception's message, shortened for a table or a JSON field."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Settings:
    """How long to time each contender."""

    warmup: int  # warm-up calls after the cold one (at least), before calibration
    min_sample_s: float  # one timed batch of calls lasts at least this long
    min_repeats: int
    max_repeats: int
    budget_s: float  # repeats are chosen to fill about this much time


QUICK = Settings(warmup=0, min_sample_s=0.01, min_repeats=3, max_repeats=15, budget_s=0.4)
FULL = Settings(warmup=3, min_sample_s=0.02, min_repeats=5, max_repeats=50, budget_s=3.0)


@dataclass
class Timing:
    median_s: float  # per operation
    samples_s: list[float]  # per operation, one per timed batch
    calls_per_sample: int
    cold_s: float  # the first call: compilation, autotuning and allocation included


def _timed(fn: Callable[[], object], n: int, cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def measure(
    fn: Callable[[], object],
    *,
    cuda: bool,
    settings: Settings,
    per_call: int = 1,
    warmup: int = 0,
) -> Timing:
    """Median time of one operation of `fn` (`per_call` operations per call)."""
    s = settings
    cold = _timed(fn, 1, cuda)
    for _ in range(max(warmup, s.warmup)):
        _timed(fn, 1, cuda)
    t = _timed(fn, 1, cuda)
    first = [t] if t >= s.budget_s / 3 else []  # a slow call's timing already is a sample
    if not first:  # calibrate on the best of three calls: a descheduled one would inflate it
        t = min(t, _timed(fn, 1, cuda), _timed(fn, 1, cuda))
    number = max(1, min(100_000, math.ceil(s.min_sample_s / max(t, 1e-7))))
    repeats = min(s.max_repeats, max(s.min_repeats, int(s.budget_s / (number * max(t, 1e-9)))))
    samples = first + [_timed(fn, number, cuda) for _ in range(repeats - len(first))]
    samples = [x / (number * per_call) for x in samples]
    return Timing(statistics.median(samples), samples, number, cold / per_call)


@dataclass
class Probe:
    """What the chosen device can do, measured once at start-up (the rooflines)."""

    device: str  # "cpu" or "cuda"
    name: str  # "NVIDIA H100 80GB HBM3", "AMD EPYC"
    slug: str  # for file names: "h100-80gb-hbm3", "cpu-amd-epyc"
    copy_gbps: float  # device-to-device copy, bytes read + written per second / 1e9, best batch
    # dtype name -> dense matmul TFLOP/s, best batch (CPU fp32: or a convolution's, if higher)
    matmul_tflops: dict[str, float]
    cache_bytes: int  # last-level cache (L2 on a GPU)
    threads: int

    def peak_tflops(self, dtype: torch.dtype) -> float:
        half = dtype in (torch.float16, torch.bfloat16)
        return self.matmul_tflops["float16" if half else "float32"]


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in out.split("-") if p)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown cpu"


def _cpu_cache_bytes() -> int:
    sizes = []
    for index in range(4):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 * 2**20)


def probe(device: torch.device, quick: bool) -> Probe:
    """Copy bandwidth and matmul peaks of `device`, measured now: the best timed batch (a peak
    is what the device can do, not what it did on average)."""
    cuda = device.type == "cuda"
    settings = QUICK if quick else FULL
    if cuda:
        name = torch.cuda.get_device_name(device)
        slug = _slug(name.removeprefix("NVIDIA "))
        cache = torch.cuda.get_device_properties(device).L2_cache_size
        copy_bytes, matmuls = 2**30, {"float16": 8192, "float32": 4096}
    else:
        name = _cpu_name()
        slug = "cpu-" + _slug(name)
        cache = _cpu_cache_bytes()
        copy_bytes = max(4 * cache, 2**27 if quick else 2**28)
        matmuls = {"float32": 1024 if quick else 2048, "float16": 256}  # fp16 is emulated on CPUs
    src = torch.ones(copy_bytes // 4, device=device)
    t = measure(functools.partial(torch.empty_like(src).copy_, src), cuda=cuda, settings=settings)
    copy_gbps = 2 * copy_bytes / min(t.samples_s) / 1e9
    del src
    tflops = {}
    for dtype_name, n in matmuls.items():
        a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype_name))
        b, c = torch.randn_like(a), torch.empty_like(a)
        t = measure(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), cuda=cuda, settings=settings)
        tflops[dtype_name] = 2 * n**3 / min(t.samples_s) / 1e12
    if not cuda:  # a CPU BLAS may leave vector units idle that oneDNN convolutions use
        tflops["float32"] = max(tflops["float32"], _conv_tflops(quick, settings))
    return Probe(device.type, name, slug, copy_gbps, tflops, cache, torch.get_num_threads())


def _conv_tflops(quick: bool, settings: Settings) -> float:
    """fp32 TFLOP/s of a 3x3 convolution on the CPU (256 -> 256 channels at 32x32)."""
    channels, size = (128, 16) if quick else (256, 32)
    x = torch.randn(1, channels, size, size)
    w = torch.randn(channels, channels, 3, 3)
    t = measure(lambda: torch.nn.functional.conv2d(x, w, padding=1), cuda=False, settings=settings)
    return 2 * channels**2 * 9 * size**2 / min(t.samples_s) / 1e12


@dataclass
class Context:
    """What a section's `cases(ctx)` may use."""

    device: torch.device
    quick: bool
    probe: Probe
    settings: Settings
    profile: bool  # profile the contenders that ask for it (torch.profiler)
    notes: list[str] = field(default_factory=list)  # per section, printed under its table

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def rotations(self, set_bytes: int, limit: int = 1024) -> int:
        """How many copies of an input set of `set_bytes` bytes to cycle through so that together
        they exceed twice the last-level cache (an operation then finds its inputs in DRAM)."""
        return max(1, min(limit, math.ceil(2 * self.probe.cache_bytes / max(set_bytes, 1))))

    def measure(self, fn: Callable[[], object], *, per_call: int = 1, warmup: int = 0) -> Timing:
        return measure(fn, cuda=self.cuda, settings=self.settings, per_call=per_call, warmup=warmup)


@dataclass
class Contender:
    """One implementation timed on a Case. `setup()` builds its inputs and models (untimed) and
    returns the call to time; it raises Skip when the implementation cannot run here."""

    name: str
    setup: Callable[[], Callable[[], object]]
    baseline: bool = False
    per_call: int = 1  # operations one call performs (e.g. steps replayed in one CUDA graph)
    warmup: int = 0  # minimum warm-up calls (torch.compile's CUDA graphs need a few)
    profile_steps: int | None = None  # with ctx.profile: profile one call, report per step
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # around it all


@dataclass
class Case:
    """One workload. `unit` names one operation ("step", "forward", "run"); with `bytes`, `flops`
    and `items` per operation the harness adds GB/s and % of copy bandwidth, TFLOP/s and % of the
    matmul peak for `dtype`, images/s and s/image. `compare`: "each" reports every fastdiff
    contender against every baseline, "best" against the fastest baseline only."""

    name: str
    contenders: list[Contender]
    params: dict = field(default_factory=dict)
    unit: str = "call"
    bytes: int | None = None
    flops: int | None = None
    dtype: torch.dtype | None = None
    items: int | None = None
    compare: str = "each"


def figures(case: Case, seconds: float, probe: Probe) -> dict[str, float]:
    """Throughput figures of one operation taking `seconds`."""
    out = {}
    if case.bytes:
        out["gbps"] = case.bytes / seconds / 1e9
        out["roofline_pct"] = 100 * case.bytes / (probe.copy_gbps * 1e9) / seconds
    if case.flops:
        peak = probe.peak_tflops(case.dtype or torch.float32)
        out["tflops"] = case.flops / seconds / 1e12
        out["roofline_pct"] = 100 * case.flops / (peak * 1e12) / seconds
    if case.items:
        out["images_per_s"] = case.items / seconds
        out["s_per_image"] = seconds / case.items
    return out


def format_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError


def profile_call(fn: Callable[[], object], ctx: Context, steps: int, top: int = 15) -> dict:
    """torch.profiler over one call: the top kernels (CUDA) or ops (CPU) by self time, per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    ctx.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        ctx.synchronize()
    wall = time.perf_counter() - t0
    if ctx.cuda:
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        self_us = lambda e: getattr(e, "self_device_time_total", 0.0)
    else:
        events = list(prof.key_averages())
        self_us = lambda e: e.self_cpu_time_total
    events.sort(key=self_us, reverse=True)
    total = sum(self_us(e) for e in events)
    return {
        "what": "CUDA kernels" if ctx.cuda else "CPU ops",
        "steps": steps,
        "wall_us_per_step": 1e6 * wall / steps,
        "self_us_per_step": total / steps,
        "top": [
            {
                "name": e.key[:160],
                "calls_per_step": e.count / steps,
                "self_us_per_step": self_us(e) / steps,
                "share_pct": 100 * self_us(e) / total if total else 0.0,
            }
            for e in events[:top]
        ],
    }


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_case(case: Case, ctx: Context, label: str) -> dict:
    """Time every contender of `case` (printing a line each) and pair them into result rows."""
    names = [c.name for c in case.contenders]
    if len(set(names)) != len(names):
        raise ValueError(f"{case.name}: contender names must be unique, got {names}")
    results: dict[str, dict] = {}
    profiles = {}
    for c in case.contenders:
        print(f"{label} {case.name} · {c.name} ...", end=" ", file=sys.stderr, flush=True)
        try:
            with torch.no_grad(), c.scope():  # setups and timed calls alike
                fn = c.setup()
                t = ctx.measure(fn, per_call=c.per_call, warmup=c.warmup)
                if ctx.profile and c.profile_steps:
                    try:
                        profiles[c.name] = profile_call(fn, ctx, c.profile_steps)
                    except Exception as e:  # the timing stands; the profile is an extra
                        ctx.note(f"profile of {case.name} · {c.name} failed: {first_line(e)}")
        except Skip as e:
            results[c.name] = {"baseline": c.baseline, "skipped": str(e)}
            print(f"skipped: {e}", file=sys.stderr)
            continue
        except Exception as e:  # recorded, and run.py exits non-zero at the end
            traceback.print_exc(file=sys.stderr)
            error = f"{type(e).__name__}: {first_line(e)}"
            results[c.name] = {"baseline": c.baseline, "error": error}
            print(f"ERROR: {error}", file=sys.stderr)
            continue
        finally:
            fn = None
            _release()
        results[c.name] = {
            "baseline": c.baseline,
            "median_s": t.median_s,
            "samples_s": t.samples_s,
            "calls_per_sample": t.calls_per_sample,
            "operations_per_call": c.per_call,
            "cold_s": t.cold_s,
            **figures(case, t.median_s, ctx.probe),
        }
        spread = (max(t.samples_s) - min(t.samples_s)) / t.median_s
        print(
            f"{format_time(t.median_s)}/{case.unit} "
            f"({len(t.samples_s)}x{t.calls_per_sample} calls, spread {100 * spread:.0f}%)",
            file=sys.stderr,
        )
    return {
        "name": case.name,
        "params": case.params,
        "unit": case.unit,
        "bytes": case.bytes,
        "flops": case.flops,
        "items": case.items,
        "compare": case.compare,
        "contenders": results,
        "rows": _rows(case, results),
        "profiles": profiles,
    }


def _rows(case: Case, results: dict[str, dict]) -> list[dict]:
    timed = {n: r for n, r in results.items() if "median_s" in r}
    baselines = [n for n, r in timed.items() if r["baseline"]]
    if case.compare == "best" and baselines:
        baselines = [min(baselines, key=lambda n: timed[n]["median_s"])]
    rows = []
    for f, r in timed.items():
        if r["baseline"]:
            continue
        for b in baselines:
            rows.append(
                {
                    "baseline": b,
                    "fastdiff": f,
                    "baseline_s": timed[b]["median_s"],
                    "fastdiff_s": r["median_s"],
                    "ratio": timed[b]["median_s"] / r["median_s"],
                }
            )
    return rows
