"""benchmarks/run.py end to end on the CPU (quick mode, two sections): its JSON holds every field a
result needs and every ratio is a finite positive number. No timing assertions: the figures
themselves live in benchmarks/results/."""

import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["step", "group_norm"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--device", "cpu"]
    proc = subprocess.run(
        [*cmd, "--only", *SECTIONS, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"run.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, f"expected one JSON file in {out}, got {files}"
    return json.loads(files[0].read_text()), files[0], proc.stdout


def test_names_the_device_versions_commit_and_date(run):
    result, path, _ = run
    device = result["device"]
    assert device["type"] == "cpu" and device["name"] and device["slug"].startswith("cpu-")
    assert path.name.startswith(device["slug"] + "-" + result["date"][:10])
    assert device["copy_gbps"] > 0 and device["threads"] >= 1
    assert all(v > 0 for v in device["matmul_tflops"].values())
    assert {"float16", "float32"} <= set(device["matmul_tflops"])
    versions = result["versions"]
    assert versions["torch"] and versions["python"]
    assert {"cuda", "triton", "diffusers", "fastdiff"} <= set(versions)
    assert len(result["commit"]) == 40 and int(result["commit"], 16) >= 0
    assert datetime.datetime.fromisoformat(result["date"]).tzinfo is not None
    assert result["quick"] is True and result["wall_s"] > 0


def test_every_case_has_raw_medians(run):
    result, _, _ = run
    assert list(result["sections"]) == SECTIONS
    for name, section in result["sections"].items():
        assert section["title"] and not section.get("skipped"), name
        assert section["complete"] is True, name
        assert section["cases"], name
        for case in section["cases"]:
            timed = 0
            for who, c in case["contenders"].items():
                assert "error" not in c, (name, case["name"], who, c.get("error"))
                if "skipped" in c:
                    continue
                timed += 1
                samples = c["samples_s"]
                assert samples and 0 < min(samples) <= c["median_s"] <= max(samples)
                assert c["gbps"] > 0 and c["roofline_pct"] > 0  # both sections move bytes
            assert timed >= 2, (name, case["name"])


def test_every_ratio_is_finite_and_positive(run):
    result, _, _ = run
    for name, section in result["sections"].items():
        for case in section["cases"]:
            assert case["rows"], (name, case["name"], "no fastdiff-vs-baseline row")
            for row in case["rows"]:
                ratio = row["ratio"]
                assert math.isfinite(ratio) and ratio > 0, (name, case["name"], row)
                assert ratio == pytest.approx(row["baseline_s"] / row["fastdiff_s"])
                assert case["contenders"][row["baseline"]]["baseline"]
                assert not case["contenders"][row["fastdiff"]]["baseline"]


def test_prints_a_table_and_plots_each_section(run):
    _, path, stdout = run
    for name in SECTIONS:
        assert f"### {name}: " in stdout
        assert path.with_name(f"{path.stem}-{name}.png").stat().st_size > 0
    assert stdout.count("| case | baseline | fastdiff | ratio |") == len(SECTIONS)


def test_a_section_that_cannot_set_up_costs_only_itself(tmp_path, monkeypatch):
    """A section whose cases() raises is recorded with its error (and the run fails), the
    sections after it still run, and the JSON is written as the run goes."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import run as bench

    class Broken:
        """cannot set up"""

        @staticmethod
        def cases(ctx):
            raise RuntimeError("no such device")

    class Empty:
        """nothing to time"""

        @staticmethod
        def cases(ctx):
            return []

    monkeypatch.setattr(bench, "SECTIONS", {"broken": Broken, "empty": Empty})
    args = ["--quick", "--device", "cpu", "--no-profile", "--out", str(tmp_path)]
    assert bench.main(args) == 1
    [path] = tmp_path.glob("*.json")
    sections = json.loads(path.read_text())["sections"]
    assert sections["broken"]["error"] == "RuntimeError: no such device"
    assert sections["broken"]["cases"] == [] and sections["empty"]["complete"] is True


def _shared_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from sections import _shared

    return _shared


def test_stable_fast_contender_without_stable_fast_is_skipped_with_how_to_get_it(monkeypatch):
    shared = _shared_module(monkeypatch)
    from harness import Skip

    monkeypatch.setitem(sys.modules, "sfast.compilers.diffusion_pipeline_compiler", None)
    with pytest.raises(Skip, match=r"stable-fast is not installed .*benchmarks/README\.md"):
        shared.stable_fast(torch.nn.Identity(), torch.device("cpu"))


def test_stable_fast_contender_computes_diffusers_unet_at_every_timestep(monkeypatch):
    """The compiled copy takes the timestep as an input (a trace that froze it would give the
    first step's output at every step) and leaves the shared twin as it was."""
    pytest.importorskip("sfast.compilers.diffusion_pipeline_compiler")  # an optional peer
    shared = _shared_module(monkeypatch)
    torch.manual_seed(0)
    config = dict(
        sample_size=16,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    twin = shared.diffusers().UNet2DModel(**config).eval()
    compiled = shared.stable_fast(twin, torch.device("cpu"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for t in (900, 500, 3):
            want = twin(x, torch.tensor(t), return_dict=False)[0]
            got = compiled(x, torch.tensor(t), return_dict=False)[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert twin.forward.__func__ is type(twin).forward


def test_stable_fast_scope_keeps_its_triton_patch_inside(monkeypatch):
    """Importing stable-fast's Triton kernels patches Triton's launchers for the whole process;
    the contender's scope puts that patch back in place for its own calls only."""
    pytest.importorskip("triton")
    shared = _shared_module(monkeypatch)
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    original = JITFunction.run
    monkeypatch.setattr(JITFunction, "run", original)  # restored at teardown, whatever happens
    monkeypatch.setattr(Autotuner, "run", Autotuner.run)
    monkeypatch.setattr(shared, "_TRITON_PATCHES", {})

    def patched(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    with shared.stable_fast_scope():
        JITFunction.run = patched  # what `import sfast.triton` does
    assert JITFunction.run is original
    with shared.stable_fast_scope():
        assert JITFunction.run is patched  # stable-fast's kernels still get their launcher
        with pytest.raises(RuntimeError):
            with shared.stable_fast_scope():
                raise RuntimeError("a contender that fails")
        assert JITFunction.run is patched
    assert JITFunction.run is original
