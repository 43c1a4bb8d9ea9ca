"""Write fastdiff/assets/digits_stats.npz: the FID statistics (mu, sigma) of all 1797 of
scikit-learn's digits (fastdiff.data.digits(16)) under the shipped `digits` extractor, with the
sha256 of the classifier file they belong to (fastdiff.metrics.fid.reference_statistics uses them
only for that classifier).

    python scripts/make_digits_stats.py      # a few seconds; rerun after retraining the classifier
"""

from __future__ import annotations

from fastdiff import data
from fastdiff.metrics.digits import DigitsClassifier
from fastdiff.metrics.fid import DIGITS_STATS, statistics


def main() -> None:
    classifier = DigitsClassifier.load()
    stats = statistics(data.digits(16), classifier)
    stats.save(
        DIGITS_STATS, classifier_sha256=classifier.sha256, made_by="scripts/make_digits_stats.py"
    )
    d = stats.mu.shape[0]
    print(f"wrote {DIGITS_STATS}: {stats.n} images, {d} features ({stats.extractor})")


if __name__ == "__main__":
    main()
