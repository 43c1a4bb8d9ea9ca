"""Fréchet Inception Distance (Heusel et al. 2017): the Fréchet distance between Gaussians fitted
to the features of two image sets,

    FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)),

in float64 throughout. Feature statistics are streamed (Chan et al.'s pairwise update of the mean
and the centred scatter matrix), so memory does not grow with the number of images.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
from torch import nn

from fastdiff.metrics.base import Extractor, Score, as_float64, extract, is_feature_matrix
from fastdiff.metrics.digits import ASSETS, DigitsClassifier
from fastdiff.metrics.extractors import get_extractor

DIGITS_STATS = ASSETS / "digits_stats.npz"
REFERENCES = ("digits",)  # names of reference image sets fid() and kid() accept
_IMAG_TOL = 1e-3  # pytorch-fid's bound on the imaginary part of sqrtm's diagonal
_CROSS_CHECK_RTOL = 1e-5  # sqrtm vs eigenvalues, relative to Tr(S1) + Tr(S2)


class SingularCovarianceWarning(RuntimeWarning):
    """A covariance is (nearly) singular: the FID is unreliable."""


@dataclass
class Statistics:
    """Mean (D,) and covariance (D, D) in float64 of `n` feature vectors from `extractor`."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str

    @classmethod
    def from_features(cls, features, extractor: str = "features") -> Statistics:
        running = RunningStatistics(extractor)
        running.update(features)
        return running.result()

    def save(self, path: str | Path, **extra) -> Path:
        """Write an .npz with mu and sigma (as pytorch-fid's and clean-fid's files have them),
        n, extractor and any `extra` arrays."""
        np.savez(
            path, mu=self.mu, sigma=self.sigma, n=self.n, extractor=np.str_(self.extractor), **extra
        )
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Statistics:
        """Statistics from an .npz with mu and sigma (ours, pytorch-fid's or clean-fid's; the
        latter two name no extractor: "unknown")."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no statistics file at {path}")
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(
                    f"{path} holds {sorted(f.keys())}, not FID statistics (arrays mu and sigma)"
                )
            n = int(f["n"]) if "n" in f else 0
            extractor = str(f["extractor"]) if "extractor" in f else "unknown"
            return cls(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), n, extractor)


class RunningStatistics:
    """Mean and covariance of features fed in batches, in float64 (Chan, Golub & LeVeque 1979:
    merge each batch's mean and centred scatter matrix; no sum of squares of raw values)."""

    def __init__(self, extractor: str = "features") -> None:
        self.extractor = extractor
        self.n = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None  # sum (f - mean)(f - mean)^T

    def update(self, features) -> None:
        f = as_float64(features)  # (B, D)
        if f.ndim != 2:
            raise ValueError(f"features must be (B, D), got shape {f.shape}")
        b = f.shape[0]
        if b == 0:
            return
        mean_b = f.mean(0)
        centred = f - mean_b
        scatter_b = centred.T @ centred
        if self.mean is None:
            self.n, self.mean, self.scatter = b, mean_b, scatter_b
            return
        if f.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features of width {f.shape[1]} after {self.mean.shape[0]}")
        n = self.n + b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (b / n)
        self.scatter = self.scatter + scatter_b + np.outer(delta, delta) * (self.n * b / n)
        self.n = n

    def result(self) -> Statistics:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        return Statistics(self.mean, self.scatter / (self.n - 1), self.n, self.extractor)


def statistics(
    images,
    extractor: str | nn.Module = "digits",
    *,
    batch_size: int = 250,
    device=None,
) -> Statistics:
    """Feature statistics of `images` (a tensor/array (N, C, H, W) in [-1, 1] or an iterable of
    batches), streamed `batch_size` at a time."""
    ext = get_extractor(extractor)
    running = RunningStatistics(ext.name)
    for f in extract(images, ext, batch_size=batch_size, device=device):
        running.update(f)
    return running.result()


def reference_statistics(name: str, extractor: str | nn.Module = "digits", **kwargs) -> Statistics:
    """Statistics of a named reference set ("digits": all 1797 of scikit-learn's digits): the
    shipped file for the shipped digits classifier, otherwise computed."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; valid references: {list(REFERENCES)}")
    ext = get_extractor(extractor)
    if isinstance(ext, DigitsClassifier) and DIGITS_STATS.is_file():
        with np.load(DIGITS_STATS, allow_pickle=False) as f:
            shipped_for = str(f["classifier_sha256"])
        if shipped_for == ext.sha256:
            return Statistics.load(DIGITS_STATS)
    return statistics(reference_images(name), ext, **kwargs)


def reference_images(name: str):
    from fastdiff import data

    if name != "digits":
        raise ValueError(f"unknown reference {name!r}; valid references: {list(REFERENCES)}")
    return data.digits(16)


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float | None = None) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    (S1 S2)^(1/2) comes from scipy.linalg.sqrtm, as in pytorch-fid and clean-fid; its trace is
    cross-checked against the eigenvalue form sum_i sqrt(lambda_i(S1 S2)) (the eigenvalues of a
    product of covariances are real and >= 0). A singular covariance gives a warning; if sqrtm
    then fails, eps * I (default 1e-6) is added to both covariances, as pytorch-fid does. A float
    `eps` adds eps * I always."""
    mu1, mu2 = np.atleast_1d(as_float64(mu1)), np.atleast_1d(as_float64(mu2))
    s1, s2 = np.atleast_2d(as_float64(sigma1)), np.atleast_2d(as_float64(sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shapes do not fit: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 "
            f"{s2.shape}; expected (D,) and (D, D) with one D (features of one extractor)"
        )
    if eps is not None:
        s1, s2 = s1 + eps * np.eye(d), s2 + eps * np.eye(d)
    for k, s in ((1, s1), (2, s2)):
        _check_covariance(k, s)
    covmean = _sqrtm(s1 @ s2)
    if covmean is None:
        eps = 1e-6 if eps is None else eps
        warnings.warn(
            f"sqrtm(S1 S2) is not finite; adding {eps:g} * I to both covariances",
            SingularCovarianceWarning,
            stacklevel=2,
        )
        s1, s2 = s1 + eps * np.eye(d), s2 + eps * np.eye(d)
        covmean = _sqrtm(s1 @ s2)
        if covmean is None:
            raise FloatingPointError(
                f"sqrtm(S1 S2) is not finite even with {eps:g} * I added; pass a larger eps"
            )
    tr_covmean = float(np.trace(covmean))
    tr_eig = float(np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum())
    scale = float(np.trace(s1) + np.trace(s2))
    if abs(tr_covmean - tr_eig) > _CROSS_CHECK_RTOL * max(scale, 1e-300):
        warnings.warn(
            f"Tr (S1 S2)^(1/2) is {tr_covmean:.10g} by sqrtm but {tr_eig:.10g} by eigenvalues: the "
            "covariances are ill-conditioned, so the FID is unreliable; use more images than "
            f"feature dimensions (D = {d}) or pass eps (e.g. 1e-6) to add eps * I",
            SingularCovarianceWarning,
            stacklevel=2,
        )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _check_covariance(k: int, s: np.ndarray) -> None:
    if not np.isfinite(s).all():
        raise ValueError(f"sigma{k} has non-finite entries")
    ev = np.linalg.eigvalsh((s + s.T) / 2)
    if ev[-1] <= 0 or ev[0] <= 1e-12 * ev[-1]:
        rank = int((ev > 1e-12 * max(ev[-1], 0)).sum())
        warnings.warn(
            f"sigma{k} ({s.shape[0]} x {s.shape[0]}) is singular: rank {rank}, eigenvalues in "
            f"[{ev[0]:.3g}, {ev[-1]:.3g}]. The FID is unreliable; use more images than feature "
            "dimensions, or pass eps (e.g. 1e-6) to add eps * I to both covariances",
            SingularCovarianceWarning,
            stacklevel=3,
        )


def _sqrtm(a: np.ndarray) -> np.ndarray | None:
    """The real part of sqrtm(a), None if it is not finite; raises on a large imaginary part."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    if not np.isfinite(root).all():
        return None
    if np.iscomplexobj(root):
        imag = np.abs(np.diagonal(root).imag).max()
        if imag > _IMAG_TOL:
            raise ValueError(
                f"sqrtm(S1 S2) has an imaginary part of {imag:.3g} on its diagonal: the "
                "covariances are not positive semi-definite (use more images, or pass eps)"
            )
        root = root.real
    return root


def fid(
    a,
    b="digits",
    *,
    extractor: str | nn.Module = "digits",
    batch_size: int = 250,
    device=None,
    eps: float | None = None,
) -> Score:
    """FID between two image sets, each one of: images (a tensor/array (N, C, H, W) in [-1, 1]
    or an iterable of batches), precomputed Statistics, the path of a statistics .npz, or a
    reference name ("digits"). Images pass through `extractor` (a name, see EXTRACTORS, or a
    module returning features), loaded only if needed."""
    loaded: list[Extractor] = []

    def ext() -> Extractor:
        if not loaded:
            loaded.append(get_extractor(extractor))
        return loaded[0]

    def stats(x) -> Statistics:
        if isinstance(x, Statistics):
            return x
        if isinstance(x, str) and x in REFERENCES:
            return reference_statistics(x, ext(), batch_size=batch_size, device=device)
        if isinstance(x, str | Path):
            return Statistics.load(x)
        if is_feature_matrix(x):
            return Statistics.from_features(x, _name(extractor))
        return statistics(x, ext(), batch_size=batch_size, device=device)

    sa, sb = stats(a), stats(b)
    names = {sa.extractor, sb.extractor} - {"unknown"}
    if len(names) > 1:
        raise ValueError(
            f"the two statistics come from different extractors ({sa.extractor} and "
            f"{sb.extractor}); an FID compares features of one extractor"
        )
    value = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma, eps=eps)
    return Score("FID", value, names.pop() if names else "unknown", n=(sa.n, sb.n))


def _name(extractor) -> str:
    return extractor if isinstance(extractor, str) else getattr(extractor, "name", "features")
