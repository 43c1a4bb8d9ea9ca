"""Feature extractors by name, and user modules as extractors."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fastdiff.metrics.base import Extractor, ModuleExtractor
from fastdiff.metrics.digits import DigitsClassifier
from fastdiff.metrics.inception import InceptionV3FID

EXTRACTORS: dict[str, Callable[..., Extractor]] = {
    "digits": DigitsClassifier.load,  # load(path=None, device="cpu")
    "inception-v3-fid": InceptionV3FID.load,  # load(weights=None, device="cpu")
}


def get_extractor(extractor: str | nn.Module = "digits", **options) -> Extractor:
    """An extractor by name (options go to its loader, e.g. weights=PATH for inception-v3-fid),
    an Extractor as is, or any nn.Module returning features (N, D) wrapped as one."""
    if isinstance(extractor, Extractor):
        return extractor
    if isinstance(extractor, nn.Module):
        return ModuleExtractor(extractor, **options)
    if extractor not in EXTRACTORS:
        raise ValueError(
            f"unknown extractor {extractor!r}; valid extractors: {sorted(EXTRACTORS)} or a "
            "torch.nn.Module returning features (N, D)"
        )
    return EXTRACTORS[extractor](**options)
