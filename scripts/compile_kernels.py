"""Compile fastdiff's GPU kernels for a GPU that is not here, and report what the compiler made:

    python scripts/compile_kernels.py [--arch 90] [--json FILE] [--only step ...] [--jobs N]

Triton: every kernel configuration that the `triton` backends of the step, attention and
GroupNorm+SiLU ops choose for a list of shapes (the tests' odd shapes and the benchmark shapes)
is compiled ahead of time to sm_<arch> with Triton's own toolchain, through the real launchers,
by a driver that only compiles (no CUDA driver or device is needed). CUDA C++: the kernels of
fastdiff._C, when it was built with CUDA, are read from its embedded cubin.

For each kernel: registers, spill bytes, stack frame, shared memory, and from the SASS the widths
of its global loads and stores and its matrix instructions (HGMMA is Hopper's warpgroup MMA,
HMMA the older warp-level one). Exit status 1 when a kernel fails to compile, needs more shared
memory than the arch has, or spills registers; the interpreter that runs Triton in the CPU test
suite checks none of these.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __name__ == "__main__":
    if os.environ.pop("TRITON_INTERPRET", None) == "1":  # before any kernel is defined
        print("compile_kernels.py: ignoring TRITON_INTERPRET=1", file=sys.stderr)

import torch

# The most dynamic shared memory one block may use, per compute capability (CUDA C++
# Programming Guide, "Technical Specifications per Compute Capability").
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
SECTIONS = ("step", "attention", "group_norm")


@dataclass
class Kernel:
    """One compiled kernel and what its cubin says about it."""

    source: str  # "triton" or "cuda"
    name: str
    config: dict  # launcher inputs and the constexprs / launch options they led to
    registers: int = 0
    spill_bytes: int = 0  # spill stores + spill loads (ptxas)
    stack_bytes: int = 0
    shared_bytes: int = 0
    memory_ops: dict = field(default_factory=dict)  # SASS opcode (LDG.E.128, ...) -> count
    mma_ops: dict = field(default_factory=dict)  # HGMMA..., HMMA... -> count
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # findings that do not fail the check


def nvidia_tool(name: str) -> str:
    """ptxas / cuobjdump: the ones Triton ships, else the CUDA toolkit's on PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return str(bundled)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"compile_kernels.py: {name} not found (neither in triton nor on PATH)")
    return found


def sass_summary(sass: str) -> tuple[dict, dict]:
    """Counts of global memory opcodes (with their width suffix) and of matrix instructions."""
    memory = Counter(re.findall(r"\b((?:LDGSTS|LDG|STG)(?:\.[A-Z0-9_]+)*)(?![A-Z])", sass))
    mma = Counter(re.findall(r"\b((?:HGMMA|HMMA|QGMMA|IMMA)(?:\.[A-Za-z0-9_]+)*)", sass))
    return dict(sorted(memory.items())), dict(sorted(mma.items()))


def ptxas_usage(ptx: str, arch: str) -> tuple[int, int, int]:
    """(registers, spill bytes, stack frame bytes) as ptxas reports them for this PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run(
            [nvidia_tool("ptxas"), "-v", f"-arch={arch}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
        )
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed: {run.stderr.strip()[:500]}")
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", run.stderr)
    stack = re.search(r"(\d+) bytes stack frame", run.stderr)
    return (
        int(regs.group(1)) if regs else 0,
        sum(int(s) for s in spills),
        int(stack.group(1)) if stack else 0,
    )


def check_limits(k: Kernel, arch: int) -> None:
    limit = MAX_SHARED.get(arch)
    if limit is not None and k.shared_bytes > limit:
        k.problems.append(f"shared memory {k.shared_bytes} B > {limit} B, the sm_{arch} limit")
    if k.spill_bytes:
        k.problems.append(f"spills {k.spill_bytes} B of registers to local memory")


# --- Triton: a driver that only compiles --------------------------------------------------------


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: reports a target, never loads or launches."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def __getattr__(self, name):
        raise RuntimeError(f"compile_kernels.py compiles only; Triton asked its driver for {name}")


class TritonCompiler:
    """Inside `with TritonCompiler(arch) as c:`, launching a Triton kernel compiles it for the
    target instead; `c.take()` returns the kernels compiled since the last call."""

    def __init__(self, arch: int):
        self.arch = arch
        self._seen: set[int] = set()

    def __enter__(self) -> TritonCompiler:
        import triton
        from triton.runtime import jit

        self._jit = jit.JITFunction
        self._run = self._jit.run
        self._functions: list = []
        functions = self._functions

        def run(fn, *args, grid, warmup, **kwargs):  # compile; never launch
            if fn not in functions:
                functions.append(fn)
            return self._run(fn, *args, grid=grid, warmup=True, **kwargs)

        self._jit.run = run
        self._active = triton.runtime.driver._active
        triton.runtime.driver.set_active(_CompileOnlyDriver(self.arch))
        return self

    def __exit__(self, *exc) -> None:
        import triton

        self._jit.run = self._run
        triton.runtime.driver._active = self._active

    def take(self) -> Iterator[tuple[str, object]]:
        for fn in self._functions:
            for cache, *_ in fn.device_caches.values():
                for compiled in cache.values():
                    if id(compiled) not in self._seen:
                        self._seen.add(id(compiled))
                        yield fn.__name__, compiled


def describe_triton(name: str, compiled, config: dict, arch: int) -> Kernel:
    md = compiled.metadata
    constexprs = {
        k: v for k, v in getattr(md, "constants", {}).items() if isinstance(v, int | float | str)
    }
    opts = {k: getattr(md, k) for k in ("num_warps", "num_stages") if hasattr(md, k)}
    k = Kernel("triton", name, {**config, **opts, "constexprs": constexprs})
    k.shared_bytes = int(md.shared)
    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    k.registers, k.spill_bytes, k.stack_bytes = ptxas_usage(compiled.asm["ptx"], target)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run(
            [nvidia_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True
        ).stdout
    k.memory_ops, k.mma_ops = sass_summary(sass)
    check_limits(k, arch)
    return k


# --- the configurations ------------------------------------------------------------------------


def _rand(shape, dtype, channels_last=False):
    t = torch.randn(shape).to(dtype)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Launch:
    """One call of an op's `triton` backend, on CPU tensors standing in for CUDA ones."""

    config: dict
    op: object  # fastdiff.ops._dispatch.Op
    args: tuple
    kwargs: dict = field(default_factory=dict)
    tile: dict | None = None  # attention: a TILE_CANDIDATES entry instead of launch_config's

    def run(self) -> None:
        if self.tile is not None:
            from fastdiff.kernels.attention import attention_fwd

            attention_fwd(*self.args, config=self.tile)
            return
        self.op.get("triton").fn(*self.args, **self.kwargs)

    def by_name_only(self) -> str | None:
        """Why automatic dispatch would pass over this call on a CUDA device (asked with fake
        CUDA tensors of the same shapes); None when it would take the Triton kernel."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        rule = self.op.get("triton").by_name_only
        if rule is None:
            return None
        with FakeTensorMode():
            args = [
                torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda")
                if isinstance(a, torch.Tensor)
                else a
                for a in self.args
            ]
            return rule(*args, **self.kwargs)


def step_launches() -> Iterator[Launch]:
    """Every distinct (history, noise) kind of sampler, in each dtype: plain NCHW; guided and
    clamped channels_last; and (fp16) an odd size that defeats vector alignment, NCHW and
    channels_last (5 channels: the element-by-element GATHER tile); (fp32) 16 channels_last
    channels. Then the noise kernel (gaussian_) in each dtype, NCHW and channels_last. `tile`
    records the kernel's tile layout (kernels/step.py)."""
    from fastdiff import Schedule
    from fastdiff.kernels.step import _layout
    from fastdiff.ops.step import step_op
    from fastdiff.samplers import SAMPLERS, build_plan

    names = {0: "memory", 1: "gather", 2: "transpose"}

    kinds = {}
    for sampler in SAMPLERS:
        plan = build_plan(sampler, Schedule.stable_diffusion(), 6)
        kinds.setdefault((plan.n_history, plan.stochastic), (sampler, plan.table.float()))
    for (n_history, stochastic), (sampler, table) in kinds.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            variants = [((2, 4, 64, 64), False, False), ((2, 4, 64, 64), True, True)]
            if dtype == torch.float16:
                variants += [((3, 5, 7, 11), False, True), ((3, 5, 7, 11), True, True)]
            if dtype == torch.float32:
                variants.append(((2, 16, 32, 32), True, False))
            for shape, channels_last, guided in variants:
                x, y = _rand(shape, dtype, channels_last), _rand(shape, dtype, channels_last)
                hs = [_rand(shape, dtype, channels_last) if i < n_history else None for i in (0, 1)]
                config = dict(op="step", sampler=sampler, shape=list(shape), dtype=_name(dtype))
                tile = _layout(x, None, flat=not stochastic)[1]["constexprs"]["LAYOUT"]
                config.update(channels_last=channels_last, guided=guided, tile=names[int(tile)])
                args = (x, y, y if guided else None, *hs, table, torch.tensor(0))
                flags = torch.zeros(table.shape[0], dtype=torch.int32)  # as fastdiff.sample
                kw = dict(seed=1, sample_offset=0, guidance=2.0 if guided else 1.0, nonfinite=flags)
                kw.update(clamp=(-1.0, 1.0) if guided else None, stochastic=stochastic)
                yield Launch(config, step_op, args, kw)
    # the noise alone (a sample's x_T), in each dtype and layout
    from fastdiff.ops.noise import gaussian_op

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape, channels_last in [((2, 4, 64, 64), False), ((2, 4, 64, 64), True)]:
            out = _rand(shape, dtype, channels_last)
            config = dict(op="gaussian", shape=list(shape), dtype=_name(dtype))
            tile = _layout(out, None)[1]["constexprs"]["LAYOUT"]
            config.update(channels_last=channels_last, tile=names[int(tile)])
            yield Launch(config, gaussian_op, (out, 1, 0), dict(sample_offset=0, scale=14.6))


# (B, H, Lq, Lkv, d, dv): the tests' odd lengths and head dims, and the TARGETS.md shapes
ATTENTION_SHAPES = [
    (1, 2, 97, 97, 40, 40),
    (1, 2, 97, 1025, 72, 72),
    (1, 2, 64, 64, 64, 64),
    (1, 2, 97, 33, 160, 160),
    (1, 2, 64, 64, 256, 256),
    (2, 8, 4096, 4096, 40, 40),  # SD1.5 self-attention
    (2, 8, 4096, 77, 40, 40),  # SD1.5 cross-attention
    (2, 8, 4096, 4096, 64, 64),
    (256, 1, 256, 256, 256, 256),  # ddpm-cifar10
    (1, 2, 50, 70, 48, 24),  # dv != d
]


def attention_launches() -> Iterator[Launch]:
    """The launch_config choice for every shape and dtype, and in fp16 every tiling of
    TILE_CANDIDATES (which benchmarks/run.py times on a GPU), on one shape per padded head dim."""
    from fastdiff.kernels.attention import TILE_CANDIDATES, _pad
    from fastdiff.ops.attention import ATTENTION

    tiled = set()
    for B, H, lq, lkv, d, dv in ATTENTION_SHAPES:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            q = torch.empty(B, H, lq, d, dtype=dtype)
            k, v = torch.empty(B, H, lkv, d, dtype=dtype), torch.empty(B, H, lkv, dv, dtype=dtype)
            config = dict(op="attention", shape=[B, H, lq, lkv, d, dv], dtype=_name(dtype))
            yield Launch(config, ATTENTION, (q, k, v, d**-0.5))
            if dtype == torch.float16 and _pad(max(d, dv)) not in tiled:
                tiled.add(_pad(max(d, dv)))
                for tile in TILE_CANDIDATES[_pad(max(d, dv))]:
                    yield Launch({**config, "tile": tile}, ATTENTION, (q, k, v, d**-0.5), tile=tile)


# (shape, groups): the tests' uneven groups and the TARGETS.md / SD1.5 shapes
GROUP_NORM_SHAPES = [
    ((1, 8, 5, 7), 4),
    ((2, 64, 33, 17), 32),
    ((256, 128, 32, 32), 32),
    ((2, 320, 64, 64), 32),
    ((2, 1280, 16, 16), 32),
]


def group_norm_launches() -> Iterator[Launch]:
    from fastdiff.ops.group_norm_silu import GROUP_NORM_SILU

    # every fused extra with every tile kind: scale-shift (ADM), an x-shaped residual, and a
    # (B, C) one (a DDPM block's timestep embedding)
    for shape, groups in GROUP_NORM_SHAPES:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for channels_last in (False, True):
                for extra in ("scale_shift", "x-shaped", "per-channel"):
                    x = _rand(shape, dtype, channels_last)
                    w, b = torch.randn(shape[1]), torch.randn(shape[1])
                    ss = r = None
                    if extra == "scale_shift":
                        ss = torch.randn(shape[0], 2 * shape[1]).to(dtype)
                    elif extra == "x-shaped":
                        r = _rand(shape, dtype, channels_last)
                    else:
                        r = torch.randn(shape[:2]).to(dtype)
                    config = dict(op="group_norm_silu", shape=list(shape), groups=groups)
                    config.update(dtype=_name(dtype), channels_last=channels_last)
                    config.update(scale_shift=ss is not None, residual=None if r is None else extra)
                    yield Launch(config, GROUP_NORM_SILU, (x, groups, w, b, 1e-5, ss, r))


LAUNCHES = {
    "step": step_launches,
    "attention": attention_launches,
    "group_norm": group_norm_launches,
}


def compile_triton(arch: int, sections: list[str], jobs: int = 1) -> list[Kernel]:
    """Compile every launch of the chosen sections, over `jobs` processes (each compiles every
    jobs-th launch; the result keeps the launches' order). A kernel that automatic dispatch
    passes over on CUDA (it runs only when named) may spill: that is a note, not a problem."""
    if jobs <= 1:
        return [Kernel(**d) for _, d in _compile_share(arch, sections, 0, 1)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawned, not forked: a fork would inherit the parent's OpenMP and Triton state
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        shares = pool.map(functools.partial(_compile_share, arch, sections, jobs=jobs), range(jobs))
        found = sorted((pair for share in shares for pair in share), key=lambda p: p[0])
    return [Kernel(**d) for _, d in found]


def _compile_share(arch: int, sections: list[str], share: int, jobs: int) -> list[tuple]:
    """(launch index, the kernel as a dict) for the launches i with i % jobs == share."""
    launches = [(section, launch) for section in sections for launch in LAUNCHES[section]()]
    kernels = []
    with TritonCompiler(arch) as compiler:
        for i, (section, launch) in enumerate(launches):
            if i % jobs != share:
                continue
            by_name = launch.by_name_only()
            if by_name:
                launch.config["by_name_only"] = by_name
            try:
                launch.run()
            except Exception as e:  # a compile error is a finding, not a crash
                text = str(e).strip().splitlines()
                k = Kernel("triton", section, launch.config)
                k.problems.append(f"does not compile: {text[-1] if text else repr(e)}")
                kernels.append((i, asdict(k)))
                continue
            for name, compiled in compiler.take():
                k = describe_triton(name, compiled, launch.config, arch)
                if by_name:
                    k.notes += [p for p in k.problems if p.startswith("spills")]
                    k.problems = [p for p in k.problems if not p.startswith("spills")]
                kernels.append((i, asdict(k)))
    return kernels


# --- CUDA C++: the extension's own cubin --------------------------------------------------------


def _demangle(names: list[str]) -> list[str]:
    if not names or not shutil.which("c++filt"):
        return names
    run = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    out = run.stdout.splitlines()
    return out if len(out) == len(names) else names


def _short(demangled: str) -> str:
    """`void fastdiff::step::(anonymous namespace)::step_vector_kernel<float>(...)` ->
    `step_vector_kernel<float>`."""
    text = demangled.replace("(anonymous namespace)::", "").replace("c10::", "")
    head = text.removeprefix("void ").split("(", 1)[0]
    name, _, args = head.partition("<")
    return name.rsplit("::", 1)[-1] + (f"<{args}" if args else "")


def cuda_kernels(arch: int) -> list[Kernel]:
    """The kernels of fastdiff._C's sm_<arch> cubin; [] when it was built without CUDA."""
    from fastdiff import _ext

    if not _ext.available() or not _ext.build_info().get("cuda"):
        return []
    so = _ext.load().__file__
    cuobjdump = nvidia_tool("cuobjdump")
    usage = subprocess.run(
        [cuobjdump, "--dump-resource-usage", "-arch", f"sm_{arch}", so],
        capture_output=True,
        text=True,
    ).stdout
    sass = subprocess.run(
        [cuobjdump, "-sass", "-arch", f"sm_{arch}", so], capture_output=True, text=True
    ).stdout
    found = re.findall(r"Function (\S+?):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    # SASS per function: "Function : <mangled>" headers split the listing
    bodies = dict(
        re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*\.{8,}|\n\s*Function : |\Z)", sass, re.S)
    )
    names = _demangle([f[0] for f in found])
    kernels = []
    for (mangled, regs, stack, shared, local), demangled in zip(found, names):
        k = Kernel("cuda", _short(demangled), {"symbol": demangled})
        k.registers, k.stack_bytes, k.shared_bytes = int(regs), int(stack), int(shared)
        k.spill_bytes = int(local)  # local memory beyond the stack frame
        k.memory_ops, k.mma_ops = sass_summary(bodies.get(mangled, ""))
        check_limits(k, arch)
        kernels.append(k)
    return kernels


# --- report --------------------------------------------------------------------------------------


def table(kernels: list[Kernel]) -> str:
    rows = [
        "| kernel | config | regs | spill B | stack B | smem B | global ld/st | mma | problems |"
    ]
    rows.append("| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for k in kernels:
        cfg = {key: v for key, v in k.config.items() if key not in ("constexprs", "op", "symbol")}
        keep = ("BLOCK", "BLOCK_M", "BLOCK_N", "D_PAD", "BLOCK_C", "BLOCK_S", "ONE_TILE")
        cfg.update({c: v for c, v in k.config.get("constexprs", {}).items() if c in keep})
        text = ", ".join(f"{key}={v}" for key, v in cfg.items())
        mem = " ".join(f"{op}x{n}" for op, n in k.memory_ops.items())
        mma = " ".join(f"{op}x{n}" for op, n in k.mma_ops.items())
        found = k.problems + [
            f"({note}; by name only: {k.config['by_name_only']})" for note in k.notes
        ]
        rows.append(
            f"| {k.source}:{k.name} | {text} | {k.registers} | {k.spill_bytes} | {k.stack_bytes} "
            f"| {k.shared_bytes} | {mem} | {mma} | {'; '.join(found)} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    p.add_argument("--json", type=Path, help="write every kernel's figures here")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--no-cuda", action="store_true", help="skip fastdiff._C's CUDA kernels")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes compiling Triton kernels (default: the CPUs, at most 8)",
    )
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_kernels.py: unset TRITON_INTERPRET (kernels must be compiled)")
    try:
        import triton
    except ImportError:
        raise SystemExit("compile_kernels.py needs triton (pip install triton)") from None
    started = time.perf_counter()
    kernels = compile_triton(args.arch, args.only, args.jobs)
    if not args.no_cuda:
        kernels += cuda_kernels(args.arch)
    print(table(kernels))
    bad = [k for k in kernels if k.problems]
    wall = time.perf_counter() - started
    print(
        f"\n{len(kernels)} kernels for sm_{args.arch} (triton {triton.__version__}, "
        f"torch {torch.__version__}) in {wall:.0f} s; {len(bad)} with problems"
    )
    if args.json:
        report = dict(
            arch=args.arch,
            triton=triton.__version__,
            torch=torch.__version__,
            wall_s=wall,
            kernels=[asdict(k) for k in kernels],
        )
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
