"""fastdiff.metrics against external oracles (pytorch-fid, clean-fid, closed forms) and the
shipped digits extractor and statistics."""

import importlib.util
import inspect
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from fastdiff import data, metrics
from fastdiff.metrics.digits import WEIGHTS, DigitsClassifier
from fastdiff.metrics.fid import DIGITS_STATS, RunningStatistics, Statistics
from fastdiff.metrics.inception import InceptionV3FID
from fastdiff.metrics.inception_score import score_from_probabilities

ROOT = Path(__file__).resolve().parent.parent


def random_covariance(rng, d, n=None):
    a = rng.normal(size=(n or 2 * d, d))
    return a.T @ a / (n or 2 * d)


def random_stats(rng, d):
    return (
        rng.normal(size=d),
        random_covariance(rng, d),
        rng.normal(size=d),
        random_covariance(rng, d),
    )


# -- the Fréchet distance ----------------------------------------------------------------------


class _SqrtmWithDisp:
    """scipy.linalg as pytorch-fid and clean-fid expect it: sqrtm(A, disp=False) returning
    (root, error estimate), which scipy 1.18 no longer accepts; everything else passes through."""

    def __init__(self, linalg):
        self._linalg = linalg

    def sqrtm(self, a, disp=True):
        root = self._linalg.sqrtm(a)
        if disp:
            return root
        error = np.linalg.norm(root @ root - a, "fro") / np.linalg.norm(a, "fro")
        return root, error

    def __getattr__(self, name):
        return getattr(self._linalg, name)


@pytest.mark.parametrize("d", [2, 64, 128])
def test_frechet_distance_equals_pytorch_fid_and_clean_fid(d, monkeypatch):
    pytorch_fid = pytest.importorskip("pytorch_fid.fid_score")
    cleanfid = pytest.importorskip("cleanfid.fid")
    stats = random_stats(np.random.default_rng(d), d)
    ours = metrics.frechet_distance(*stats)
    with warnings.catch_warnings(), monkeypatch.context() as patch:
        warnings.simplefilter("ignore", DeprecationWarning)  # their sqrtm(disp=False)
        if "disp" not in inspect.signature(scipy.linalg.sqrtm).parameters:
            # scipy 1.18 dropped sqrtm's disp; both call sqrtm(A, disp=False) -> (root, error)
            for module in (pytorch_fid, cleanfid):
                patch.setattr(module, "linalg", _SqrtmWithDisp(module.linalg))
        theirs = [pytorch_fid.calculate_frechet_distance(*stats), cleanfid.frechet_distance(*stats)]
    for value in theirs:
        assert ours == pytest.approx(value, rel=1e-6)


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma, _, _ = random_stats(rng, 64)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    x = torch.from_numpy(rng.normal(size=(300, 16)))
    assert abs(metrics.fid(x, x).value) < 1e-9


def test_shifted_gaussians_give_the_closed_form():
    # commuting covariances: Tr (S1 S2)^(1/2) = sum sqrt(l1 l2) in the shared eigenbasis
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    l1, l2 = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-12)
    # 2x2, not commuting: Tr M^(1/2) = sqrt(Tr M + 2 sqrt(det M)) for M = S1 S2
    s1, s2 = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[0.5, -0.2], [-0.2, 3.0]])
    m = s1 @ s2
    tr_root = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    exact = 1.0 + np.trace(s1 + s2) - 2 * tr_root
    got = metrics.frechet_distance([0.0, 0.0], s1, [1.0, 0.0], s2)
    assert got == pytest.approx(exact, rel=1e-12)


def test_sampled_gaussians_approach_the_closed_form():
    """Streamed statistics of N samples: the FID converges to the analytic value."""
    rng = np.random.default_rng(2)
    l1, l2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.3, 1.0, 2.0, 1.0])
    shift = np.array([1.0, -0.5, 0.0, 0.25])
    exact = shift @ shift + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    batches = lambda scale, mu: (
        mu + rng.normal(size=(1000, 4)) * np.sqrt(scale) for _ in range(50)
    )
    a, b = RunningStatistics("gauss"), RunningStatistics("gauss")
    for fa, fb in zip(batches(l1, 0), batches(l2, shift)):
        a.update(fa)
        b.update(fb)
    got = metrics.fid(a.result(), b.result())
    assert got.value == pytest.approx(exact, abs=0.03)  # N = 50000: sampling error ~0.01
    assert got.extractor == "gauss"


def test_streamed_statistics_match_numpy_and_survive_a_large_mean():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(1001, 5)) @ rng.normal(size=(5, 5)) + 1e8  # |mean| >> std
    running = RunningStatistics()
    for part in np.array_split(f, [1, 7, 300, 301, 900]):
        running.update(torch.from_numpy(part))
    s = running.result()
    assert s.n == 1001
    np.testing.assert_allclose(s.mu, f.mean(0), rtol=1e-14)
    np.testing.assert_allclose(s.sigma, np.cov(f, rowvar=False), rtol=1e-7, atol=1e-7)
    naive = (f.T @ f - 1001 * np.outer(f.mean(0), f.mean(0))) / 1000  # what a sum of squares gets
    assert np.abs(naive - np.cov(f, rowvar=False)).max() > 1  # ... and why it is not used


def test_statistics_stream_images_from_a_generator():
    x = data.digits(16)[:300]
    streamed = metrics.statistics(x[i : i + 37] for i in range(0, 300, 37))
    whole = metrics.statistics(x, batch_size=1000)
    np.testing.assert_allclose(streamed.sigma, whole.sigma, rtol=1e-6, atol=1e-6)
    assert streamed.n == 300 and streamed.extractor == "digits"


def test_singular_covariance_warns_and_eps_regularises():
    rng = np.random.default_rng(4)
    few = rng.normal(size=(10, 32))  # 10 samples in 32 dimensions: rank 9
    other = rng.normal(size=(500, 32))
    with pytest.warns(metrics.SingularCovarianceWarning, match="more images"):
        value = metrics.fid(few, other, extractor="features").value
    assert np.isfinite(value)
    with warnings.catch_warnings():
        warnings.simplefilter("error", metrics.SingularCovarianceWarning)
        reg = metrics.fid(few, other, extractor="features", eps=1e-6).value
    assert reg == pytest.approx(value, rel=1e-2)


def test_statistics_round_trip_and_mismatched_extractors(tmp_path):
    rng = np.random.default_rng(5)
    s = Statistics.from_features(rng.normal(size=(50, 3)), "mine")
    s.save(tmp_path / "s.npz")
    back = Statistics.load(tmp_path / "s.npz")
    assert back.n == 50 and back.extractor == "mine"
    np.testing.assert_array_equal(back.sigma, s.sigma)
    np.savez(tmp_path / "pytorch_fid.npz", mu=s.mu, sigma=s.sigma)  # no extractor named
    assert metrics.fid(tmp_path / "pytorch_fid.npz", s).extractor == "mine"
    other = Statistics(s.mu, s.sigma, 50, "digits")
    with pytest.raises(ValueError, match="different extractors"):
        metrics.fid(s, other)
    with pytest.raises(ValueError, match="shapes do not fit"):
        metrics.frechet_distance(s.mu, s.sigma, s.mu[:2], s.sigma[:2, :2])


def test_images_outside_the_range_are_refused():
    with pytest.raises(ValueError, match=r"expected \[-1, 1\]"):
        metrics.fid(torch.rand(20, 1, 16, 16) * 255)
    with pytest.raises(ValueError, match="unknown extractor"):
        metrics.fid(data.digits(16)[:20], extractor="vgg")


# -- KID and IS --------------------------------------------------------------------------------


def test_kid_equals_clean_fid_on_the_same_sets():
    cleanfid = pytest.importorskip("cleanfid.fid")
    rng = np.random.default_rng(6)
    fa, fb = rng.normal(size=(120, 20)), rng.normal(size=(120, 20)) + 0.3
    # one subset of every feature: the estimate no longer depends on the random draw
    ours = metrics.kid(fa, fb, subsets=1, subset_size=120)
    theirs = cleanfid.kernel_distance(fa, fb, num_subsets=1, max_subset_size=120)
    assert ours.value == pytest.approx(theirs, rel=1e-10)


def test_kid_is_unbiased_and_sees_a_shift():
    rng = np.random.default_rng(7)
    same = metrics.kid(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)), subset_size=150)
    assert abs(same.value) < 3 * same.std  # unbiased: ~0 for one distribution
    shifted = metrics.kid(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 0.5, subsets=20)
    assert shifted.value > 10 * shifted.std
    assert str(shifted).startswith("KID ") and "±" in str(shifted)


def test_inception_score_known_answers():
    k = 10
    uniform = np.full((100, k), 1 / k)
    assert score_from_probabilities(uniform) == pytest.approx((1.0, 0.0))
    confident_and_spread = np.eye(k)[np.arange(100) % k]
    assert score_from_probabilities(confident_and_spread, splits=10) == pytest.approx((k, 0.0))
    with pytest.raises(ValueError, match="sum to 1"):
        score_from_probabilities(np.ones((20, k)))


# -- the digits extractor and its reference statistics ------------------------------------------


def _train_script():
    path = ROOT / "scripts" / "train_digits_classifier.py"
    spec = importlib.util.spec_from_file_location("train_digits_classifier", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_classifier_held_out_accuracy():
    script = _train_script()
    model = DigitsClassifier.load()
    _, test_idx = script.split(seed=0)
    x, y = data.digits(16)[test_idx], torch.from_numpy(data.digit_labels())[test_idx]
    acc = script.accuracy(model, x, y)
    assert acc >= 0.97
    recorded = json.loads(WEIGHTS.with_suffix(".json").read_text())["held_out_accuracy"]
    assert acc == pytest.approx(recorded, abs=1e-6)


def test_shipped_digits_statistics_are_current():
    shipped = Statistics.load(DIGITS_STATS)
    assert shipped.n == 1797 and shipped.extractor == "digits"
    fresh = metrics.statistics(data.digits(16))
    np.testing.assert_allclose(shipped.mu, fresh.mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shipped.sigma, fresh.sigma, rtol=1e-5, atol=1e-4)
    assert metrics.reference_statistics("digits").extractor == "digits"


def test_digits_scores_on_real_digits_and_noise():
    x = data.digits(16)
    score = metrics.fid(x)
    assert score.value < 1e-6 and str(score).endswith("[digits] (1797 vs 1797 images)")
    noise = torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert metrics.fid(noise).value > 100 * metrics.fid(x[::2]).value
    isc = metrics.inception_score(x)
    assert 9 < isc.value <= 10 and isc.extractor == "digits"


def test_any_module_is_an_extractor():
    pool = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())  # (N, 16) features
    x = data.digits(16)
    score = metrics.fid(x[:600], x[600:1200], extractor=pool)
    assert score.extractor == "module:Sequential" and score.value > 0
    named = metrics.get_extractor(pool, name="avgpool4")
    assert metrics.fid(x[:600], x[600:1200], extractor=named).extractor == "avgpool4"
    with pytest.raises(ValueError, match="no classifier head"):
        metrics.inception_score(x[:100], extractor=pool)


# -- the FID Inception network -----------------------------------------------------------------


def _random_inception(seed=0) -> InceptionV3FID:
    """Random weights, with BatchNorm statistics set from one batch so activations stay O(1)."""
    torch.manual_seed(seed)
    net = InceptionV3FID()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative: one batch sets the running statistics
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 75, 75) * 2 - 1)
    return net.eval()


@pytest.mark.slow
def test_inception_features_equal_pytorch_fid(monkeypatch):
    inception = pytest.importorskip("pytorch_fid.inception")
    net = _random_inception()
    state = net.state_dict()
    # pytorch-fid builds its FID network, then loads weights through load_state_dict_from_url:
    # hand it our random state instead of a download (and fail if it ever tries the network)
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda url, **kw: state)
    theirs = inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    x = torch.rand(2, 3, 21, 37, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = net.features(x)
        ref = theirs((x + 1) / 2)[0].reshape(2, -1)  # pytorch-fid takes [0, 1]
        grey = net.features(x[:, :1])
        grey_ref = theirs((x[:, :1].expand(-1, 3, -1, -1) + 1) / 2)[0].reshape(2, -1)
    assert ours.shape == (2, 2048) and ref.abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grey, grey_ref, rtol=1e-5, atol=1e-5)


def test_inception_weights_load_from_a_local_file_only(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTDIFF_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # an empty download cache
    with pytest.raises(FileNotFoundError, match="pytorch-fid") as e:
        metrics.get_extractor("inception-v3-fid")
    assert "--inception-weights" in str(e.value) and "weights=PATH" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        InceptionV3FID.load(tmp_path / "nowhere.pth")
    torch.manual_seed(0)
    path = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(InceptionV3FID().state_dict(), path)
    monkeypatch.setenv("FASTDIFF_INCEPTION_WEIGHTS", str(path))
    net = metrics.get_extractor("inception-v3-fid")
    assert net.name == "inception-v3-fid" and not net.training
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing"):
        InceptionV3FID.load(tmp_path / "bad.pth")


# -- the command line --------------------------------------------------------------------------


def test_fid_command(tmp_path, capsys):
    from fastdiff.metrics.cli import main

    x = data.digits(16)
    np.savez(tmp_path / "a.npz", images=x[:400].numpy())
    assert main([str(tmp_path / "a.npz"), "--save-stats", str(tmp_path / "s.npz"), "--isc"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FID ") and "[digits] (400 vs 1797 images)" in out[0]
    assert out[1].startswith("IS ") and "[digits]" in out[1]
    assert main([str(tmp_path / "s.npz"), "digits", "--json"]) == 0
    (score,) = json.loads(capsys.readouterr().out)["scores"]
    assert score["extractor"] == "digits"
    assert score["value"] == pytest.approx(metrics.fid(x[:400]).value, rel=1e-9)
    assert main([str(tmp_path / "missing.npz")]) == 1
    assert "does not exist" in capsys.readouterr().err
