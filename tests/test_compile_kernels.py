"""Every GPU kernel compiles for sm_90 without a GPU (scripts/compile_kernels.py), and what the
compiler made of it has the properties the kernels were written for: no register spills, shared
memory within the limit, 16-byte global accesses on the bandwidth-bound paths and Hopper's
warpgroup MMA (HGMMA) in the 16-bit attention kernels. The CPU test suite runs Triton in its
interpreter, which checks none of this."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_scripts import SCRIPTS, load_script

from fastdiff import Schedule
from fastdiff.samplers import SAMPLERS, build_plan

pytest.importorskip("triton")


def compile_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, every time
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    out = tmp / "kernels.json"
    run = subprocess.run(
        [sys.executable, SCRIPTS / "compile_kernels.py", "--json", out],
        capture_output=True,
        text=True,
        env=compile_env(tmp),
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads(out.read_text())


# the samplers whose plans draw noise (compile_kernels.py builds them the same way)
NOISY = {s for s in SAMPLERS if build_plan(s, Schedule.stable_diffusion(), 6).stochastic}


def kernels(report, source, op=None, **config):
    found = [
        k
        for k in report["kernels"]
        if k["source"] == source
        and (op is None or k["config"].get("op") == op)
        and all(k["config"].get(key) == v for key, v in config.items())
    ]
    assert found, f"no {source} kernel for {op} {config}"
    return found


def test_every_triton_kernel_compiles_within_the_limits(report):
    assert report["arch"] == 90
    ops = {k["config"].get("op") for k in report["kernels"] if k["source"] == "triton"}
    assert ops == {"step", "gaussian", "attention", "group_norm_silu"}
    for k in report["kernels"]:
        assert not k["problems"], (k["name"], k["config"], k["problems"])
        assert 0 < k["registers"] <= 255 and k["shared_bytes"] <= 227 * 1024


def test_step_kernel_moves_16_bytes_per_access(report):
    # 2x4x64x64 NCHW in every dtype: every state, model output and history load and every store
    # is 16 bytes (4 fp32, 8 fp16/bf16), with no shared memory round trip for the noise; the
    # only narrow stores are the non-finite flag's (predicated, 32-bit, at most one per 16-byte
    # row of x_next: no reduction across threads)
    for dtype in ("float32", "float16", "bfloat16"):
        for k in kernels(report, "triton", "step", dtype=dtype, channels_last=False, guided=False):
            ops = k["memory_ops"]
            assert k["spill_bytes"] == 0 and k["shared_bytes"] == 0, k["config"]
            assert ops.get("LDG.E.128", 0) >= 2 and ops.get("STG.E.128"), (k["config"], ops)
            narrow = [op for op in ops if op.startswith("STG") and op != "STG.E.128"]
            assert narrow == ["STG.E"] and ops["STG.E"] <= ops["STG.E.128"], (k["config"], ops)


def test_channels_last_step_kernels_move_16_bytes_per_access(report):
    # 2x4x64x64 channels_last (guided): with noise the TRANSPOSE tile, 16-byte accesses in
    # memory order with the noise transposed through at most 4 KiB of shared memory; without
    # noise the MEMORY tile, as NCHW. 16 channels_last channels the same. No spills.
    for k in kernels(report, "triton", "step", channels_last=True):
        if k["config"]["shape"] not in ([2, 4, 64, 64], [2, 16, 32, 32]):
            continue
        ops, tile = k["memory_ops"], k["config"]["tile"]
        assert tile == ("transpose" if k["config"]["sampler"] in NOISY else "memory"), k["config"]
        assert k["spill_bytes"] == 0, k["config"]
        assert k["shared_bytes"] <= (4096 if tile == "transpose" else 0), k["config"]
        assert ops.get("LDG.E.128", 0) >= 2 and ops.get("STG.E.128"), (k["config"], ops)
        narrow = [op for op in ops if op.startswith("STG") and op != "STG.E.128"]
        assert narrow == ["STG.E"] and ops["STG.E"] <= ops["STG.E.128"], (k["config"], ops)
    for k in kernels(report, "triton", "gaussian", channels_last=True):
        assert k["config"]["tile"] == "transpose" and k["spill_bytes"] == 0, k["config"]
        assert [op for op in k["memory_ops"] if op.startswith("STG")] == ["STG.E.128"], k


def test_noise_kernel_stores_16_bytes_per_thread(report):
    # x_T alone, NCHW: one 16-byte store per thread and nothing else written or read from
    # global memory but libdevice's sin/cos reduction table (LDG.E.CONSTANT); no spills
    for dtype in ("float32", "float16", "bfloat16"):
        for k in kernels(report, "triton", "gaussian", dtype=dtype, channels_last=False):
            ops = k["memory_ops"]
            assert k["spill_bytes"] == 0 and k["shared_bytes"] == 0, (k["config"], k)
            assert [op for op in ops if op.startswith("STG")] == ["STG.E.128"], ops
            assert set(ops) <= {"STG.E.128", "LDG.E.CONSTANT"}, ops


def test_16_bit_attention_uses_hgmma_and_wide_loads(report):
    for dtype in ("float16", "bfloat16"):
        for k in kernels(report, "triton", "attention", dtype=dtype):
            assert k["spill_bytes"] == 0, k["config"]
            assert any(op.startswith("HGMMA") for op in k["mma_ops"]), (k["config"], k["mma_ops"])
            # head dims 40, 72, 160 too: rows 16-byte aligned, cp.async copies into shared memory
            assert any(op.startswith("LDGSTS") and op.endswith(".128") for op in k["memory_ops"])
            assert "by_name_only" not in k["config"]


def test_fp32_attention_is_left_to_sdpa_on_cuda(report):
    # its FMA dots spill at every tile size: reported as notes, and dispatch passes over it
    for k in kernels(report, "triton", "attention", dtype="float32"):
        assert "float32" in k["config"]["by_name_only"]
        assert not k["problems"]


def test_group_norm_kernels_never_spill(report):
    for k in kernels(report, "triton", "group_norm_silu"):
        assert k["spill_bytes"] == 0, k["config"]
    # NCHW reads run along contiguous positions: 16-byte loads
    for k in kernels(report, "triton", "group_norm_silu", shape=[256, 128, 32, 32]):
        if not k["config"]["channels_last"]:
            assert k["memory_ops"].get("LDG.E.128", 0), k["memory_ops"]


def test_cuda_extension_kernels(report):
    from fastdiff import _ext

    if not (_ext.available() and _ext.build_info().get("cuda")):
        pytest.skip("fastdiff._C was built without CUDA")
    # NCHW (and noise-free channels_last) states; channels_last ones with noise and 2^k
    # channels, the noise transposed through shared memory (kThreads * V floats)
    for kind, shared in (("step_vector", {}), ("step_tile", {"float": 4096, "Half": 8192})):
        step = [k for k in report["kernels"] if k["source"] == "cuda" and kind in k["name"]]
        assert len(step) == 3  # float, Half, BFloat16
        for k in step:
            ops = k["memory_ops"]
            assert ops.get("LDG.E.128", 0) >= 2 and ops.get("STG.E.128", 0), (k["name"], ops)
            assert k["spill_bytes"] == 0
            dtype = k["name"].split("<")[1].rstrip(">").replace("BFloat16", "Half")
            # the report counts the 1 KiB that sm_90 reserves per block
            assert k["shared_bytes"] <= shared.get(dtype, 0) + 1024, k
    # the noise kernels: a Philox block's 4 values in one store (16 bytes fp32, 8 fp16/bf16);
    # the channels_last tile, 16 bytes per thread from the transposed tile in shared memory
    noise = {
        k["name"]: k for k in report["kernels"] if k["source"] == "cuda" and "gaussian" in k["name"]
    }
    types = ("BFloat16", "Half", "float")
    assert sorted(noise) == sorted(
        f"gaussian{kind}_kernel<{t}>" for kind in ("", "_tile") for t in types
    )
    for name, k in noise.items():
        tile = "_tile" in name
        wide = "STG.E.128" if tile or name.endswith("<float>") else "STG.E.64"
        assert k["memory_ops"].get(wide) == 1 and k["spill_bytes"] == 0, (name, k["memory_ops"])
        shared = (4096 if name.endswith("<float>") else 8192) if tile else 0
        assert k["shared_bytes"] <= shared + 1024, k
    # GroupNorm+SiLU: <dtype, channels_last, run length[, cached runs]>. Runs: one element, or
    # 16 bytes, or in channels_last every power of two in between (per-group channel counts such
    # as SD1.5's 10 and 20); each run length has the one-kernel path (4 cache sizes; one for
    # single elements) and the two-launch path's pair
    norm = {}
    for k in report["kernels"]:
        pattern = r"group_norm_(silu|stats|apply)_kernel<(\w+), (\w+), (\d+)(?:, (\d+))?>"
        m = re.fullmatch(pattern, k["name"])
        if k["source"] == "cuda" and m:
            norm[m.groups()] = k
    itemsize = {"float": 4, "Half": 2, "BFloat16": 2}
    expected = set()
    for t, size in itemsize.items():
        for cl in ("false", "true"):
            runs = [16 // size] + ([r for r in (2, 4) if r < 16 // size] if cl == "true" else [])
            for r in map(str, runs):
                expected |= {("silu", t, cl, r, c) for c in ("1", "2", "4", "8")}
            expected.add(("silu", t, cl, "1", "8"))
            for r in map(str, [1, *runs]):
                expected |= {("stats", t, cl, r, None), ("apply", t, cl, r, None)}
    assert set(norm) == expected
    width = {4: "", 8: ".64", 16: ".128"}  # SASS suffix of a 32/64/128-bit access
    for key, k in norm.items():
        # no spills; at most a few bytes kept across calls of fp32 division's slow path
        assert k["spill_bytes"] == 0 and k["stack_bytes"] <= 16, k
        run_bytes = int(key[3]) * itemsize[key[1]]
        if run_bytes >= 4:  # a run is one load and (but for the statistics) one store
            ops = k["memory_ops"]
            assert ops.get("LDG.E" + width[run_bytes], 0), k
            assert key[0] == "stats" or ops.get("STG.E" + width[run_bytes], 0), k
            assert not any(op.startswith("STG.E.U") for op in ops), k  # no 8- or 16-bit stores


STEP_PTX = """
import json, sys
sys.path.insert(0, {scripts!r})
import compile_kernels as ck
ptx = {{}}
with ck.TritonCompiler(90) as compiler:
    for launch in ck.step_launches():
        c = launch.config
        if c["dtype"] != "float32":
            continue
        if c["op"] == "gaussian" and not c["channels_last"]:
            name = "gaussian"
        elif c["op"] == "step" and c["guided"] and c["sampler"] in ("dpmpp_3m_sde", "unipc"):
            name = "noise" if c["sampler"] == "dpmpp_3m_sde" else "none"
        else:
            continue
        launch.run()
        (_, kernel), = compiler.take()
        ptx[name] = kernel.asm["ptx"]
print(json.dumps(ptx))
"""


def test_step_kernel_rounds_like_the_reference(tmp_path):
    """The compiled step kernel takes log/sin/cos from libdevice (no .approx instructions) with a
    correctly rounded sqrt, and contracts nothing into an FMA outside them (guided, clamped,
    two histories; with and without noise); so does the noise kernel."""
    code = STEP_PTX.format(scripts=str(SCRIPTS))
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=compile_env(tmp_path)
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ptx = json.loads(run.stdout.splitlines()[-1])
    for name in ("noise", "gaussian"):  # the step's noise, and the noise kernel's
        assert not any(op in ptx[name] for op in ("lg2.approx", "sin.approx", "cos.approx"))
        assert "sqrt.rn." in ptx[name] and "sqrt.approx" not in ptx[name]
    assert "fma" not in ptx["none"]


def test_limits_and_sass_parsing():
    ck = load_script("compile_kernels")
    big = ck.Kernel("triton", "k", {}, registers=255, spill_bytes=8, shared_bytes=300_000)
    ck.check_limits(big, 90)
    assert len(big.problems) == 2 and "232448 B" in big.problems[0]
    fine = ck.Kernel("triton", "k", {}, registers=64, shared_bytes=200_000)
    ck.check_limits(fine, 90)
    assert not fine.problems
    sass = """
        /*0090*/ LDG.E.128 R4, desc[UR4][R2.64] ;
        /*00a0*/ LDGSTS.E.BYPASS.128 [R7], desc[UR8][R4.64] ;
        /*00b0*/ LDGDEPBAR ;
        /*00c0*/ HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ;
        /*00d0*/ STG.E.U16 desc[UR4][R2.64], R5 ;
    """
    memory, mma = ck.sass_summary(sass)
    assert memory == {"LDG.E.128": 1, "LDGSTS.E.BYPASS.128": 1, "STG.E.U16": 1}
    assert mma == {"HGMMA.64x64x16.F32": 1}


def test_an_oversized_tile_is_reported(tmp_path):
    """A real compile whose shared memory exceeds sm_90's: the check catches it."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(SCRIPTS)!r})
import compile_kernels as ck
import fastdiff.kernels.attention as ka
ka.launch_config = lambda *a: dict(BLOCK_M=256, BLOCK_N=256, num_warps=8, num_stages=4)
q = torch.empty(1, 1, 300, 256, dtype=torch.float16)
with ck.TritonCompiler(90) as c:
    ka.attention_fwd(q, q, q, 0.1)
    (name, compiled), = c.take()
k = ck.describe_triton(name, compiled, {{}}, 90)
print(k.shared_bytes, k.problems)
"""
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=compile_env(tmp_path)
    )
    assert run.returncode == 0, run.stderr[-3000:]
    shared, _, problems = run.stdout.strip().partition(" ")
    assert int(shared) > 227 * 1024 and "the sm_90 limit" in problems
