"""The GPU-check scripts stay runnable where no GPU is: the compute-sanitizer driver runs its
every call on the C++ CPU kernels and compares them with the references, and gpu_check.sh parses
and refuses unknown phases."""

import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fastdiff.ops.step import step_op

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_sanitizer_driver_on_the_cpu_kernels(capsys):
    reason = step_op.get("cpu").ready()
    if reason:
        pytest.skip(reason)
    driver = load_script("sanitize_kernels")
    assert driver.main(["--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "group_norm_silu 54 calls, step 1022 calls, gaussian_ 18 calls, all equal" in out


@pytest.mark.parametrize(
    "op, run, wrong",
    [
        ("group_norm_silu", "run_group_norm", lambda real: lambda *a, **k: real(*a, **k) * 1.01),
        ("gaussian_", "run_gaussian", lambda real: lambda *a, **k: real(*a, **k).mul_(1.01)),
    ],
)
def test_sanitizer_driver_fails_on_a_wrong_result(monkeypatch, op, run, wrong):
    reason = step_op.get("cpu").ready()
    if reason:
        pytest.skip(reason)
    driver = load_script("sanitize_kernels")
    monkeypatch.setattr(driver, op, wrong(getattr(driver, op)))
    with pytest.raises(SystemExit, match=op):
        getattr(driver, run)(driver.torch.device("cpu"), "cpu")


def test_gpu_check_packs_its_results_and_keeps_to_the_deadline(tmp_path):
    """With no time left every phase is skipped and named; the results still come back as the
    two files the device tool can return (it returns at most eight)."""
    script = SCRIPTS / "gpu_check.sh"
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": "true", "DEADLINE": "0"}
    run = subprocess.run(["bash", script, "all"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-check.tar.gz", "summary.txt"]
    commit, *lines = (tmp_path / "summary.txt").read_text().splitlines()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    assert (
        commit == f"commit {head.stdout.strip()}" if head.returncode == 0 else "unknown" in commit
    )
    phases = ["build", "sanitize", "step", "test", "kernels", "test-rest", "e2e"]
    assert lines == [f"{p}: not run (deadline 0 s reached)" for p in phases]
    with tarfile.open(tmp_path / "gpu-check.tar.gz") as tar:
        assert {"./summary.txt", "./env.txt"} <= set(tar.getnames())


def test_gpu_check_names_the_commit_where_there_is_no_git(tmp_path):
    """On the GPU machine the tree arrives without .git: FASTDIFF_COMMIT names the commit, for
    the summary and the benchmark JSON."""
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    (tree / "scripts" / "gpu_check.sh").write_text((SCRIPTS / "gpu_check.sh").read_text())
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"), "PYTHON": "true"}
    env |= {"DEADLINE": "0", "FASTDIFF_COMMIT": "0123abc", "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    script = tree / "scripts" / "gpu_check.sh"
    run = subprocess.run(["bash", script, "build"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "summary.txt").read_text().splitlines()[0] == "commit 0123abc"


def test_sanitizer_parts_run_in_the_order_given(capsys):
    reason = step_op.get("cpu").ready()
    if reason:
        pytest.skip(reason)
    driver = load_script("sanitize_kernels")
    assert driver.main(["--backend", "cpu", "--only", "noise", "tiles"]) == 0
    captured = capsys.readouterr()
    assert "cpu: gaussian_ 18 calls, step 2 calls, all equal" in captured.out
    assert captured.err.splitlines() == ["cpu: noise done", "cpu: tiles done"]


def test_gpu_check_script_parses_and_refuses_unknown_phases(tmp_path):
    script = SCRIPTS / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": "true"}
    run = subprocess.run(["bash", script, "bogus"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "unknown phase bogus" in run.stderr
