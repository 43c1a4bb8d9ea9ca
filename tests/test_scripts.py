"""The GPU-check scripts stay runnable where no GPU is: the compute-sanitizer driver runs its
every call on the C++ CPU kernels and compares them with the references, and gpu_check.sh parses
and refuses unknown phases."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

from fastdiff.ops.step import step_op

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sanitizer_driver_on_the_cpu_kernels(capsys):
    reason = step_op.get("cpu").ready()
    if reason:
        pytest.skip(reason)
    driver = load_script("sanitize_kernels")
    assert driver.main(["--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "step 885 calls, group_norm_silu 18 calls, all equal" in out


def test_sanitizer_driver_fails_on_a_wrong_result(monkeypatch):
    reason = step_op.get("cpu").ready()
    if reason:
        pytest.skip(reason)
    driver = load_script("sanitize_kernels")
    real = driver.group_norm_silu
    monkeypatch.setattr(driver, "group_norm_silu", lambda *a, **k: real(*a, **k) * 1.01)
    with pytest.raises(SystemExit, match="group_norm_silu"):
        driver.run_group_norm(driver.torch.device("cpu"), "cpu")


def test_gpu_check_script_parses_and_refuses_unknown_phases(tmp_path):
    script = SCRIPTS / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": "true"}
    run = subprocess.run(["bash", script, "bogus"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "unknown phase bogus" in run.stderr
