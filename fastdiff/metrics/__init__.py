"""FID, KID and Inception Score, each reported with the feature extractor it came from.

`fid(samples)` compares images in [-1, 1] with the shipped statistics of the digits and prints
as "FID 3.214 [digits] (500 vs 1797 images)"; `extractor="inception-v3-fid"` uses the FID
Inception network with pytorch-fid's weight file (get_extractor("inception-v3-fid", weights=PATH)).
"""

from fastdiff.metrics.base import Extractor, ModuleExtractor, Score
from fastdiff.metrics.extractors import EXTRACTORS, get_extractor
from fastdiff.metrics.fid import (
    RunningStatistics,
    SingularCovarianceWarning,
    Statistics,
    fid,
    frechet_distance,
    reference_statistics,
    statistics,
)
from fastdiff.metrics.inception_score import inception_score
from fastdiff.metrics.kid import kernel_distance, kid

__all__ = [
    "EXTRACTORS",
    "Extractor",
    "ModuleExtractor",
    "RunningStatistics",
    "Score",
    "SingularCovarianceWarning",
    "Statistics",
    "fid",
    "frechet_distance",
    "get_extractor",
    "inception_score",
    "kernel_distance",
    "kid",
    "reference_statistics",
    "statistics",
]
