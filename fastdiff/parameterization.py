"""What a network predicts, as a linear map to the denoised sample.

At a point x = alpha * x0 + sigma * eps of the variance-preserving path, every supported
prediction y gives x0 = a * x + b * y with (a, b) depending only on (alpha, sigma):

    eps  (noise):       x0 = (x - sigma * eps) / alpha
    x0   (clean data):  x0 = y                       (diffusers calls it "sample")
    v    (velocity):    x0 = alpha * x - sigma * v   (Salimans & Ho 2022, v = alpha eps - sigma x0)
"""

from __future__ import annotations

import torch

PREDICTIONS = ("eps", "x0", "v")
_ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def canonical(prediction: str) -> str:
    """'eps', 'x0' or 'v' for a prediction name (diffusers' names are accepted too)."""
    p = _ALIASES.get(prediction, prediction)
    if p not in PREDICTIONS:
        valid = list(PREDICTIONS) + list(_ALIASES)
        raise ValueError(f"unknown prediction {prediction!r}; valid: {valid}")
    return p


def x0_coefficients(
    prediction: str, alpha: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) such that x0 = a * x + b * y for a model predicting `prediction` at (alpha, sigma)."""
    p = canonical(prediction)
    if p == "eps":
        return 1 / alpha, -sigma / alpha
    if p == "x0":
        return torch.zeros_like(alpha), torch.ones_like(alpha)
    return alpha, -sigma


def targets(prediction: str, x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The training target of a model predicting `prediction` (the inverse of the map above)."""
    p = canonical(prediction)
    if p == "eps":
        return eps
    if p == "x0":
        return x0
    return alpha * eps - sigma * x0
