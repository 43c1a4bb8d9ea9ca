"""`fastdiff fid`: FID (and optionally KID and IS) of an image set against another or against
shipped reference statistics. Wired into fastdiff/cli.py with add_fid_parser(subparsers);
runs alone as `python -m fastdiff.metrics.cli A [B] ...`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastdiff.metrics.extractors import EXTRACTORS

SOURCES = (
    "a folder of PNG/JPEG images, a .npy/.npz image array (uint8, or floats in [-1, 1]), a .npz "
    "of FID statistics (mu, sigma: ours, pytorch-fid's or clean-fid's), or 'digits' (the "
    "shipped statistics of scikit-learn's 1797 digits)"
)


def add_fid_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fid",
        help="FID (and KID, IS) of images against other images or reference statistics",
        description=(
            "Compute the FID between image set A and image set B, each "
            f"{SOURCES}. Every score is printed with the feature extractor it came from."
        ),
    )
    p.add_argument("a", metavar="A", help="the images to score (e.g. samples.npz)")
    p.add_argument("b", metavar="B", nargs="?", default="digits", help="the reference (digits)")
    p.add_argument(
        "--extractor",
        default="digits",
        choices=sorted(EXTRACTORS),
        help="feature extractor (default: digits, the classifier shipped with fastdiff)",
    )
    p.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="pytorch-fid's pt_inception-2015-12-05-*.pth, for --extractor inception-v3-fid",
    )
    p.add_argument("--kid", action="store_true", help="also compute KID (needs images, not stats)")
    p.add_argument("--kid-subsets", type=int, default=100, metavar="N")
    p.add_argument("--kid-subset-size", type=int, default=1000, metavar="N")
    p.add_argument("--isc", action="store_true", help="also compute the Inception Score of A")
    p.add_argument("--is-splits", type=int, default=10, metavar="N")
    p.add_argument("--batch-size", type=int, default=250, metavar="N")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--save-stats", metavar="NPZ", help="write the FID statistics of A here")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    p.set_defaults(run=run_fid)
    return p


def run_fid(args) -> int:
    import torch

    from fastdiff.metrics.extractors import get_extractor
    from fastdiff.metrics.fid import Statistics, fid, statistics
    from fastdiff.metrics.inception_score import inception_score
    from fastdiff.metrics.kid import kid

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    options = {"device": device}
    if args.inception_weights is not None:
        if args.extractor != "inception-v3-fid":
            raise ValueError("--inception-weights is for --extractor inception-v3-fid")
        options["weights"] = args.inception_weights
    ext = get_extractor(args.extractor, **options)
    a, b = (_load(x, ext) for x in (args.a, args.b))
    common = {"extractor": ext, "batch_size": args.batch_size, "device": device}
    fid_a = a
    if args.save_stats:
        fid_a = a if isinstance(a, Statistics) else statistics(a, **common)
        fid_a.save(args.save_stats)
    scores = [fid(fid_a, b, **common)]
    if args.kid:
        if any(isinstance(x, Statistics) for x in (a, b)):
            raise ValueError("KID needs images on both sides, not FID statistics (drop --kid)")
        kw = {"subsets": args.kid_subsets, "subset_size": args.kid_subset_size}
        scores.append(kid(a, b, **common, **kw))
    if args.isc:
        if isinstance(a, Statistics):
            raise ValueError("the Inception Score needs the images of A, not statistics")
        scores.append(inception_score(a, splits=args.is_splits, **common))
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "scores": [vars(s) for s in scores]}))
    else:
        for s in scores:
            print(f"{s}  A={args.a}" + (f" B={args.b}" if s.metric != "IS" else ""))
    if args.save_stats:
        print(f"wrote {args.save_stats}", file=sys.stderr)
    return 0


def _load(source: str, ext):
    """Images, Statistics or a reference name from a command-line source."""
    from fastdiff import data
    from fastdiff.metrics.fid import REFERENCES, Statistics

    if source in REFERENCES:
        return source
    path = Path(source)
    if path.is_dir():
        channels = 1 if ext.name == "digits" else 3
        size = getattr(getattr(ext, "config", None), "size", None) or _first_image_side(path)
        return data.image_folder(path, size, channels)
    if path.suffix.lower() == ".npz" and path.is_file():
        import numpy as np

        with np.load(path, allow_pickle=False) as f:
            if "mu" in f and "sigma" in f:
                return Statistics.load(path)
    return data.load_dataset(path)


def _first_image_side(path: Path) -> int:
    from PIL import Image

    from fastdiff.data import IMAGE_SUFFIXES

    for file in sorted(path.rglob("*")):
        if file.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(file) as im:
                return min(im.size)
    return 64  # no images: image_folder raises the error that says so


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdiff")
    add_fid_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["fid", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"fastdiff fid: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
