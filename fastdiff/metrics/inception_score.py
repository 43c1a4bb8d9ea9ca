"""Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), high when each image gets
a confident class and the classes are spread evenly; mean and standard deviation over splits.
With the `digits` classifier it is the IS analogue on digits (at most 10, the class count)."""

from __future__ import annotations

import numpy as np
from scipy.special import xlogy
from torch import nn

from fastdiff.metrics.base import Score, as_float64, extract_all, is_feature_matrix
from fastdiff.metrics.extractors import get_extractor


def score_from_probabilities(probs, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of exp(mean KL(p(y|x) || p(y))) over `splits` equal consecutive parts
    (N // splits rows each; a remainder is dropped, as in the original code)."""
    p = as_float64(probs)
    if p.ndim != 2 or p.shape[0] < splits or splits < 1:
        raise ValueError(
            f"probabilities must be (N, K) with N >= splits >= 1, got {p.shape}, splits={splits}"
        )
    if (p < 0).any() or not np.allclose(p.sum(1), 1, atol=1e-4):
        raise ValueError("each row of probabilities must be >= 0 and sum to 1 (a softmax)")
    size = p.shape[0] // splits
    scores = []
    for k in range(splits):
        part = p[k * size : (k + 1) * size]
        py = part.mean(0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, py)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(
    images,
    *,
    extractor: str | nn.Module = "digits",
    splits: int = 10,
    batch_size: int = 250,
    device=None,
) -> Score:
    """IS of images (as for fid) through the extractor's classifier, or of class probabilities
    given as a matrix (N, K)."""
    if is_feature_matrix(images):
        probs, name = as_float64(images), getattr(extractor, "name", extractor)
    else:
        ext = get_extractor(extractor)
        probs = extract_all(images, ext, head="probabilities", batch_size=batch_size, device=device)
        name = ext.name
    mean, std = score_from_probabilities(probs, splits)
    return Score("IS", mean, name, std=std, n=(probs.shape[0],))
