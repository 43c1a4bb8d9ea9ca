import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastdiff import checkpoints, data, ops
from fastdiff.models import UNet
from fastdiff.sample import sample


@pytest.fixture(autouse=True)
def cpu_sampling():
    """Keep the UNet off the Triton interpreter (conftest.py sets TRITON_INTERPRET=1); one
    thread, since two spinning OpenMP threads crawl on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with ops.use("reference"):
        yield
    torch.set_num_threads(threads)


def test_the_shipped_model_is_small_and_documented():
    size = checkpoints.DEFAULT_MODEL.stat().st_size
    assert size < 4e6, f"{size / 1e6:.1f} MB"
    sidecar = json.loads(checkpoints.DEFAULT_MODEL.with_suffix(".json").read_text())
    ckpt = checkpoints.load()
    assert sidecar["config"] == ckpt.model.config.to_dict()
    assert sidecar["diffusion"]["trained"]["data"] == "digits"


def test_load_default_samples_the_right_shape():
    ckpt = checkpoints.load()
    assert ckpt.sample_shape == (1, 16, 16) and ckpt.prediction == "v"
    assert ckpt.default_sampler == "dpmpp_2m" and ckpt.default_steps == 20
    assert not ckpt.model.training and next(ckpt.model.parameters()).dtype == torch.float32
    x = ckpt.sample(3, steps=2, batch_size=2, seed=5)
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()
    # the batch size does not change the images; .model works with fastdiff.sample directly
    y = sample(ckpt.model, (3, 1, 16, 16), schedule=ckpt.schedule, prediction="v", steps=2, seed=5)
    assert torch.allclose(x, y, atol=1e-5)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model at .*nothing\.safetensors"):
        checkpoints.load(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="is not a fastdiff checkpoint"):
        checkpoints.load(tmp_path)
    model = UNet.from_preset("digits", channels=(8, 16), norm_groups=4)
    model.save(tmp_path / "net")  # a bare UNet checkpoint: no schedule or prediction
    with pytest.raises(ValueError, match="no diffusion info"):
        checkpoints.load(tmp_path / "net")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="has no config"):
        checkpoints.load(tmp_path / "other.safetensors")


def test_export_round_trips(tmp_path):
    ckpt = checkpoints.load()
    out = checkpoints.export_model(checkpoints.DEFAULT_MODEL, tmp_path / "m.safetensors")
    again = checkpoints.load(out)
    assert torch.equal(again.schedule.betas, ckpt.schedule.betas)
    for a, b in zip(ckpt.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)  # already half precision: exporting again loses nothing
    # UNet.load reads the same file (the config is in its metadata)
    assert UNet.load(out).config == ckpt.model.config


def _nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return torch.cdist(torch.from_numpy(a), torch.from_numpy(b)).min(1).values.numpy()


@pytest.mark.slow
def test_shipped_model_draws_digits():
    """128 samples of the shipped model against scikit-learn's digits, and the same for an
    untrained network of the same shape: a classifier trained on real digits must recognise
    the samples about as confidently as held-out real digits and find every class; samples must
    lie about as close to real digits as held-out real digits do; the digits-feature FID (issue
    "metrics") must be far below the untrained model's."""
    real, labels = data.digits().flatten(1).numpy(), data.digit_labels()
    perm = np.random.default_rng(0).permutation(len(real))
    held, fit = perm[:300], perm[300:]
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=0.1).fit(real[fit], labels[fit])
    assert clf.score(real[held], labels[held]) > 0.9
    real_conf = clf.predict_proba(real[held]).max(1).mean()
    real_nn = _nearest(real[held], real[fit]).mean()

    ckpt = checkpoints.load()
    with torch.random.fork_rng():  # a fixed init: the untrained yardstick must not vary by run
        torch.manual_seed(0)
        net = UNet(ckpt.model.config).eval()
    untrained = checkpoints.Checkpoint(
        net, ckpt.schedule, ckpt.prediction, ckpt.sample_shape, ckpt.path
    )
    x = ckpt.sample(128, steps=10).clamp(-1, 1)
    u = untrained.sample(128, steps=5).clamp(-1, 1)

    p = clf.predict_proba(x.flatten(1).numpy())
    counts = np.bincount(p.argmax(1), minlength=10)
    conf = p.max(1).mean()
    u_conf = clf.predict_proba(u.flatten(1).numpy()).max(1).mean()
    nn, u_nn = (
        _nearest(x.flatten(1).numpy(), real).mean(),
        _nearest(u.flatten(1).numpy(), real).mean(),
    )
    report = f"conf {conf:.3f} (real {real_conf:.3f}, untrained {u_conf:.3f}), classes {counts}, "
    report += f"NN {nn:.2f} (real {real_nn:.2f}, untrained {u_nn:.2f})"
    assert conf > 0.9 * real_conf and conf > u_conf + 0.1, report
    assert counts.min() >= 3 and counts.max() <= 32, report  # every digit, none dominant
    assert nn < 1.5 * real_nn and nn < u_nn / 4, report
    try:
        from fastdiff.metrics import fid
    except ImportError:
        return
    score, u_score = fid(x).value, fid(u).value
    print(f"{report}; FID [digits] {score:.1f} (untrained {u_score:.1f})")
    assert score < u_score / 10, (score, u_score)
