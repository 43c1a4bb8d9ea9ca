import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastdiff import checkpoints, ops, train
from fastdiff.parameterization import targets
from fastdiff.schedules import Schedule

TINY = {"channels": [8, 16], "norm_groups": 4}  # 48k parameters: a step takes ~50 ms


@pytest.fixture(autouse=True)
def cpu_training():
    """conftest.py sets TRITON_INTERPRET=1: keep the UNet's ops off the (slow) interpreter; and
    one thread: on a shared 2-core machine two spinning OpenMP threads make a step ~40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with ops.use("reference"):
        yield
    torch.set_num_threads(threads)


def cpu_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return env | {"OMP_NUM_THREADS": "1"}


def tiny(out, **kw) -> train.TrainConfig:
    base = dict(out=str(out), model=TINY, batch_size=8, lr=1e-3, warmup=2, sample_every=0)
    base["device"] = "cpu"  # bit-exact comparisons: no nondeterministic GPU kernels
    return train.TrainConfig(**(base | kw))


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "log.jsonl").open()]


def test_loss_goes_down_on_digits(tmp_path):
    train.train(tiny(tmp_path, steps=40, batch_size=16, save_every=40), progress=False)
    loss = losses(tmp_path)
    assert len(loss) == 40
    assert np.mean(loss[-8:]) < 0.6 * np.mean(loss[:8])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_gamma_weights_the_x0_error_by_min_snr(prediction):
    """Whatever the model predicts, its min-SNR-weighted loss is min(snr, gamma) |x0_hat - x0|^2
    (Hang et al. 2023, eq. 9)."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    err = 0.1 * torch.randn(6, 1, 4, 4, generator=g)  # the model's x0 error
    schedule = Schedule.from_betas("linear", 1000)
    t = torch.tensor([0, 10, 100, 400, 800, 999])
    abar = schedule.alphas_cumprod
    alpha = abar[t].sqrt().float().view(-1, 1, 1, 1)
    sigma = (1 - abar[t]).sqrt().float().view(-1, 1, 1, 1)

    def model(x_t, tt):  # predicts exactly the target of the wrong x0 = x0 + err
        x0_hat = x0 + err
        eps_hat = (x_t - alpha * x0_hat) / sigma
        return targets(prediction, x0_hat, eps_hat, alpha, sigma)

    snr = abar[t] / (1 - abar[t])
    for gamma in (5.0, None):
        loss = train.diffusion_loss(model, x0, t, eps, abar, prediction, gamma)
        w = snr.clamp(max=gamma) if gamma else {"eps": snr, "x0": 1, "v": snr + 1}[prediction]
        x0_weight = w * torch.ones_like(snr)
        expected = (x0_weight * err.square().flatten(1).mean(1).double()).mean()
        assert torch.allclose(loss.double(), expected, rtol=1e-3)


def test_resume_is_exact(tmp_path):
    """Steps 0..6 in one run == 0..3, stop, resume to 6: weights, EMA, optimizer, bit for bit."""
    cfg = dict(steps=6, save_every=3, keep=5, min_snr_gamma=5.0)
    train.train(tiny(tmp_path / "a", **cfg), progress=False)
    train.train(tiny(tmp_path / "b", **(cfg | {"steps": 3})), progress=False)
    resumed = train.resume_config(tmp_path / "b", steps=6)
    assert resumed.min_snr_gamma == 5.0 and resumed.lr == 1e-3
    train.train(resumed, resume=True, progress=False)
    a = tmp_path / "a" / "checkpoints" / "step-0000006"
    b = tmp_path / "b" / "checkpoints" / "step-0000006"
    for name in (checkpoints.MODEL, checkpoints.TRAIN_STATE):  # EMA; raw weights + optimizer + RNG
        sa, sb = load_file(str(a / name)), load_file(str(b / name))
        assert sa.keys() == sb.keys()
        assert any(k.startswith("optim.") for k in sa) or name == checkpoints.MODEL
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert (
        json.loads((a / checkpoints.TRAIN_JSON).read_text())["optimizer"]
        == json.loads((b / checkpoints.TRAIN_JSON).read_text())["optimizer"]
    )
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    # the run at step 3 differs from step 6: the comparison above is not vacuous
    s3 = load_file(str(tmp_path / "b" / "checkpoints" / "step-0000003" / checkpoints.MODEL))
    assert not all(torch.equal(s3[k], load_file(str(a / checkpoints.MODEL))[k]) for k in s3)


def test_invalid_config_lists_every_problem(tmp_path):
    bad = dict(
        steps=0, warmup=-1, preset="huge", prediction="score", schedule="quadratic",
        precision="fp8", sampler="plms", lr=0.0, ema_decay=1.0, grad_clip=0.0, min_snr_gamma=-5.0,
    )  # fmt: skip
    cfg = tiny(tmp_path, **bad)
    expected = [
        "steps must be >= 1, got 0",
        "warmup must be >= 0, got -1",
        "unknown preset 'huge'; presets: [",
        "unknown prediction 'score'",
        "unknown schedule 'quadratic'; valid: [",
        "unknown precision 'fp8'; valid: [",
        "unknown sampler 'plms'; valid: [",
        "lr must be > 0, got 0.0",
        "ema_decay must be in [0, 1), got 1.0",
        "grad_clip must be > 0 (or None for no clipping), got 0.0",
        "min_snr_gamma must be > 0, got -5.0",
    ]
    problems = cfg.problems()
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected):
        assert problem.startswith(start), (problem, start)
    assert tiny(tmp_path).problems() == []
    with pytest.raises(ValueError, match="invalid training config: steps must be >= 1") as e:
        train.train(cfg, progress=False)
    assert "min_snr_gamma" in str(e.value) and not (tmp_path / "checkpoints").exists()


def test_resume_refuses_to_change_the_run(tmp_path):
    train.train(tiny(tmp_path, steps=1), progress=False)
    with pytest.raises(ValueError, match="cannot change lr"):
        train.resume_config(tmp_path, lr=0.1, steps=3)
    with pytest.raises(FileExistsError, match="--resume"):
        train.train(tiny(tmp_path, steps=2), progress=False)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train.train(tiny(tmp_path / "empty", steps=2), resume=True, progress=False)


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    train.train(tiny(tmp_path, steps=2, save_every=2), progress=False)
    before = load_file(str(tmp_path / "checkpoints" / "step-0000002" / checkpoints.TRAIN_STATE))
    real_save = checkpoints.save_file

    def crash(tensors, filename, *args, **kwargs):  # the training state: write part, then die
        if Path(filename).name != checkpoints.TRAIN_STATE:
            return real_save(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"half a safetensors header")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpoints, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.resume_config(tmp_path, steps=4), resume=True, progress=False)
    # a hard kill leaves its temporary directory behind: nothing may read it
    junk = tmp_path / "checkpoints" / ".step-0000004.tmp-999"
    junk.mkdir()
    (junk / checkpoints.TRAIN_STATE).write_bytes(b"junk")
    assert [s for s, _ in checkpoints.step_dirs(tmp_path)] == [2]
    ckpt = checkpoints.load(tmp_path)
    assert ckpt.path.parent.name == "step-0000002" and ckpt.sample_shape == (1, 16, 16)
    after = load_file(str(tmp_path / "checkpoints" / "step-0000002" / checkpoints.TRAIN_STATE))
    assert all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.setattr(checkpoints, "save_file", real_save)
    train.train(train.resume_config(tmp_path, steps=4), resume=True, progress=False)
    assert [s for s, _ in checkpoints.step_dirs(tmp_path)] == [2, 4]
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").open()] == [1, 2, 3, 4]


def test_any_schedule_is_stored_with_the_model(tmp_path):
    betas = torch.linspace(1e-3, 0.05, 200, dtype=torch.float64)
    schedule = Schedule(betas, "mine")
    final = train.train(
        tiny(tmp_path, steps=1, prediction="eps"), schedule=schedule, progress=False
    )
    ckpt = checkpoints.load(final)
    assert torch.equal(ckpt.schedule.betas, betas) and ckpt.prediction == "eps"
    assert ckpt.sample(2, steps=3).shape == (2, 1, 16, 16)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path, precision):
    train.train(tiny(tmp_path, steps=2, precision=precision), progress=False)
    assert all(np.isfinite(losses(tmp_path)))


def test_ddp_with_two_processes_matches_one(tmp_path):
    """torchrun, 2 gloo processes, global batch 8 (4 each) == 1 process with batch 8."""
    flags = [
        "--data", "digits", "--model", json.dumps(TINY), "--batch-size", "8", "--steps", "3",
        "--lr", "1e-3", "--warmup", "1", "--sample-every", "0", "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--log-dir", str(tmp_path / "torchrun-logs"), "--nproc_per_node"]  # not in /tmp
    for out, launcher in [("ddp", [*torchrun, "2"]), ("one", [sys.executable])]:
        cmd = [*launcher, "-m", "fastdiff", "train", *flags, "--out", str(tmp_path / out)]
        run = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(), timeout=300)
        if run.returncode and "address already in use" in run.stderr.lower():  # a port race
            run = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env(), timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    # a control: another seed, so that the tolerance below means something
    other = tiny(tmp_path / "other", steps=3, seed=1, warmup=1, save_every=3)
    train.train(other, progress=False)

    def weights(out):
        latest = checkpoints.latest_checkpoint(tmp_path / out)
        state = load_file(str(latest / checkpoints.TRAIN_STATE))
        return {k: v for k, v in state.items() if k.startswith("model.")}

    ddp, one, other = weights("ddp"), weights("one"), weights("other")
    diff = max((ddp[k] - one[k]).abs().max().item() for k in one)
    control = max((other[k] - one[k]).abs().max().item() for k in one)
    assert diff < 1e-5 < control / 100, (diff, control)
    assert np.allclose(losses(tmp_path / "ddp"), losses(tmp_path / "one"), rtol=1e-4)
