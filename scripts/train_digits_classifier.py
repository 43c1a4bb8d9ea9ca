"""Train the `digits` feature extractor (fastdiff/metrics/digits.py) and write it to
fastdiff/assets/digits_classifier.safetensors (+ .json with its config and held-out accuracy).

    python scripts/train_digits_classifier.py            # ~1 minute on 2 CPU cores

Data: fastdiff.data.digits(16) (sklearn's 1797 digits, 16x16, [-1, 1]); a stratified 80/20 split
(seed 0): the classifier trains on the 80% and its accuracy on the other 20% is recorded. Random
shifts by up to one pixel augment the training images. Deterministic for a given torch build.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff import data
from fastdiff.metrics.digits import WEIGHTS, DigitsClassifier, DigitsConfig

MIN_ACCURACY = 0.97


def split(seed: int = 0, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out indices of data.digits(): stratified, the same for a given seed."""
    from sklearn.model_selection import train_test_split

    labels = data.digit_labels()
    train, test = train_test_split(
        range(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    return torch.tensor(sorted(train)), torch.tensor(sorted(test))


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Translate each image by -1, 0 or 1 pixels in each direction (background is -1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    which = torch.randint(0, 9, (n,), generator=g)
    out = torch.empty_like(x)
    for k in range(9):
        dy, dx = divmod(k, 3)
        out[which == k] = padded[which == k, :, dy : dy + h, dx : dx + w]
    return out


@torch.no_grad()
def accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model.logits(x).argmax(-1) == y).float().mean())


def train(epochs: int, seed: int) -> tuple[DigitsClassifier, dict]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = data.digits(16), torch.from_numpy(data.digit_labels()).long()
    train_idx, test_idx = split(seed)
    model = DigitsClassifier(DigitsConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batches_per_epoch = (len(train_idx) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2e-3, total_steps=epochs * batches_per_epoch
    )
    for epoch in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model.logits(shift(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 5 == 0:
            acc = accuracy(model, x[test_idx], y[test_idx])
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy {acc:.4f}")
    info = {
        "held_out_accuracy": accuracy(model, x[test_idx], y[test_idx]),
        "train_accuracy": accuracy(model, x[train_idx], y[train_idx]),
        "split": {"seed": seed, "test_fraction": 0.2, "stratified": True, "n_test": len(test_idx)},
        "epochs": epochs,
        "seed": seed,
        "data": "fastdiff.data.digits(16)",
        "made_by": "scripts/train_digits_classifier.py",
    }
    return model.eval(), info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=WEIGHTS)
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model, info = train(args.epochs, args.seed)
    acc = info["held_out_accuracy"]
    print(f"held-out accuracy {acc:.4f} in {time.perf_counter() - t0:.1f} s")
    if acc < MIN_ACCURACY:
        raise SystemExit(f"held-out accuracy {acc:.4f} is below {MIN_ACCURACY}; not written")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out, info)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
