"""Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimate of the squared MMD
between two feature sets under the polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over
random subsets; reported as mean and standard deviation over the subsets."""

from __future__ import annotations

import numpy as np
from torch import nn

from fastdiff.metrics.base import Score, as_float64, extract_all, is_feature_matrix
from fastdiff.metrics.extractors import get_extractor
from fastdiff.metrics.fid import REFERENCES, reference_images


def kernel_distance(
    fa, fb, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) over `subsets` draws of min(subset_size, N_a, N_b) features from each set
    (without replacement) of the unbiased MMD^2 with the cubic polynomial kernel."""
    fa, fb = as_float64(fa), as_float64(fb)
    if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {fa.shape} and {fb.shape}")
    d = fa.shape[1]
    m = min(subset_size, fa.shape[0], fb.shape[0])
    if m < 2 or subsets < 1:
        raise ValueError(f"KID needs subsets >= 1 of at least 2 features each, got {m} features")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for k in range(subsets):
        x = fa[rng.choice(fa.shape[0], m, replace=False)]  # (m, D)
        y = fb[rng.choice(fb.shape[0], m, replace=False)]
        kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[k] = within - 2 * kxy.mean()
    return float(values.mean()), float(values.std())


def kid(
    a,
    b="digits",
    *,
    extractor: str | nn.Module = "digits",
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    batch_size: int = 250,
    device=None,
) -> Score:
    """KID between two image sets: images (as for fid), feature matrices (N, D), or a
    reference name ("digits")."""
    ext = None if all(is_feature_matrix(x) for x in (a, b)) else get_extractor(extractor)

    def features(x):
        if is_feature_matrix(x):
            return as_float64(x)
        if isinstance(x, str) and x in REFERENCES:
            x = reference_images(x)
        return extract_all(x, ext, batch_size=batch_size, device=device)

    fa, fb = features(a), features(b)
    mean, std = kernel_distance(fa, fb, subsets=subsets, subset_size=subset_size, seed=seed)
    name = ext.name if ext is not None else getattr(extractor, "name", extractor)
    return Score("KID", mean, name, std=std, n=(fa.shape[0], fb.shape[0]))
