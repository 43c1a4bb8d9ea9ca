import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff import checkpoints, cli, ops
from fastdiff.train import TrainConfig

TINY = json.dumps({"channels": [8, 16], "norm_groups": 4})


def fastdiff(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `python -m fastdiff ARGS` as a user would: no Triton interpreter, one thread."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "fastdiff", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def test_sample_command(tmp_path):
    png, npz = tmp_path / "grid.png", tmp_path / "raw.npz"
    run = fastdiff("sample", "-n", 4, "--steps", 2, "--seed", 3, "--out", png, "--npz", npz,
                   "--device", "cpu")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert re.search(r"\d+\.\d ms per step \(batch of 4\), \d+\.\d images/s", run.stdout)
    from PIL import Image

    assert Image.open(png).size == (2 * 49 + 1, 2 * 49 + 1)  # 2x2 tiles of 16 px enlarged 3x
    samples = np.load(npz)["samples"]
    assert samples.shape == (4, 1, 16, 16)
    with ops.use("reference"):
        expected = checkpoints.load().sample(4, steps=2, seed=3)
    assert np.allclose(samples, expected.clamp(-1, 1).numpy(), atol=1e-4)


def test_sample_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--sampler", "--steps", "--seed", "-n", "--batch-size", "--backend",
                 "--device", "--out", "--npz"):  # fmt: skip
        assert flag in text, flag


def test_train_help_covers_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
    assert "--resume" in text and "torchrun" in text


def test_train_resume_export_then_sample(tmp_path):
    run_dir, model = tmp_path / "run", tmp_path / "tiny.safetensors"
    flags = ["--model", TINY, "--batch-size", 4, "--sample-every", 2, "--num-samples", 4,
             "--sample-steps", 2, "--out", run_dir, "--device", "cpu"]  # fmt: skip
    run = fastdiff("train", *flags, "--steps", 2)
    assert run.returncode == 0, run.stderr
    assert "it/s" in run.stderr or "step/s" in run.stderr or "s/step" in run.stderr  # tqdm bar
    assert (run_dir / "samples" / "step-0000002.png").is_file()
    run = fastdiff("train", "--out", run_dir, "--resume", "--steps", 3, "--export", model)
    assert run.returncode == 0, run.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").open()]
    assert steps == [1, 2, 3]
    assert [s for s, _ in checkpoints.step_dirs(run_dir)] == [2, 3]
    assert checkpoints.load(model).sample(2, steps=2).shape == (2, 1, 16, 16)


def test_the_console_script_reports_user_errors_in_one_line():
    script = Path(sys.executable).parent / "fastdiff"
    if not script.exists():
        pytest.skip("the fastdiff console script is not installed (pip install -e .)")
    run = subprocess.run([script, "sample", "--steps", "0"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == (
        "fastdiff sample: error: argument --steps: must be at least 1, got 0 "
        "(see fastdiff sample --help)\n"
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--model", "{tmp}/missing"], "error: no model at .*missing: no such file"),
        (["sample", "--sampler", "nope"], "argument --sampler: invalid choice: 'nope'"),
        (["sample", "-n", "x"], "argument -n/--num: expected an integer, got 'x'"),
        (["sample", "--backend", "nope"], "unknown backend 'nope'"),
        (["sample", "--out", "grid.jpg"], "--out must be a .png file"),
        (["sample", "--device", "tpu"], "argument --device: not a device: 'tpu'"),
        (["train", "--lr", "-1"], "argument --lr: must be > 0, got -1"),
        (["train", "--prediction", "noise"], "unknown prediction 'noise'"),
        (["train", "--model", "[8, 16]"], "argument --model: expected a JSON object"),
        (["train", "--model", '{"chanels": [8]}'], r"unknown UNetConfig fields \['chanels'\]"),
        (["train", "--data", "{tmp}/missing.npz"], "missing.npz does not exist"),
        (["train", "--data", "{tmp}", "--steps", "1"], "holds no images"),
        (["train", "--out", "{tmp}", "--resume"], "nothing to resume"),
        (["train", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_user_errors(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run")] if "--out" not in argv else []
        argv += ["--no-progress"]
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code != 0
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--device", "cuda"])
    assert e.value.code == 2
    assert "CUDA is not available here" in capsys.readouterr().err
