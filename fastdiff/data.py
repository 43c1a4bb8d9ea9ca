"""Training data as one float32 tensor (N, C, H, W) in [-1, 1], and PNG grids of samples.

Sources: "digits" (scikit-learn's load_digits, 8x8 upsampled to 16x16), a folder of PNG/JPEG
images (resized and center-cropped), or a .npy/.npz array. A dataset is held in memory: this is
the reference pipeline, meant for small data sets.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".npz")
_RANGE_SLACK = 1e-3  # float arrays may overshoot [-1, 1] by this much (rounding)


class DataError(ValueError):
    """Bad training data; the message names the file and says what was expected."""


def digits(size: int = 16) -> torch.Tensor:
    """scikit-learn's 1797 handwritten digits (8x8, values 0..16), bilinearly upsampled to
    size x size, in [-1, 1]: (1797, 1, size, size)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    x = torch.from_numpy(load_digits().images).float()[:, None] / 16  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1)


def digit_labels() -> np.ndarray:
    """The class (0..9) of each image of `digits()`."""
    from sklearn.datasets import load_digits

    return load_digits().target


def image_folder(path: str | Path, size: int, channels: int = 3) -> torch.Tensor:
    """Every PNG/JPEG under `path` (recursively, sorted by path): the shorter side resized to
    `size` (bicubic), center-cropped to size x size, as (N, channels, size, size) in [-1, 1]."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading an image folder needs Pillow: pip install pillow") from None
    path = Path(path)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"image folder {path} holds no images: expected files ending in "
            f"{', '.join(IMAGE_SUFFIXES)} (in it or in its subfolders)"
        )
    out = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                w, h = im.size
                scale = size / min(w, h)
                rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
                im = im.resize((rw, rh), Image.Resampling.BICUBIC)
                left, top = (rw - size) // 2, (rh - size) // 2
                im = im.crop((left, top, left + size, top + size))
                out[i] = np.asarray(im).reshape(size, size, channels)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {file}: {e}") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1


def array_file(path: str | Path) -> torch.Tensor:
    """Images from a .npy file or a .npz archive (its only array, or the one named "images"):
    uint8 in [0, 255], or floats in [-1, 1]; laid out (N, H, W), (N, C, H, W) or (N, H, W, C)
    with C in 1, 3, 4."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read array file {path}: {e}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if len(keys) == 1:
                key = keys[0]
            elif "images" in keys:
                key = "images"
            else:
                raise DataError(
                    f"{path} holds arrays {keys}: name the images array 'images' or keep "
                    "only one array in the file"
                )
            a = loaded[key]
    else:
        a = loaded
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[1] not in (1, 3, 4) and a.shape[-1] in (1, 3, 4):
        a = a.transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    if a.ndim != 4 or a.shape[1] not in (1, 3, 4) or a.shape[0] == 0:
        raise DataError(
            f"{path} has an array of shape {a.shape}; expected images (N, H, W), (N, C, H, W) "
            "or (N, H, W, C) with C = 1, 3 or 4 and N > 0"
        )
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a)).float() / 127.5 - 1
    if not np.issubdtype(a.dtype, np.floating):
        raise DataError(
            f"{path} has dtype {a.dtype}; expected uint8 in [0, 255] or floats in [-1, 1]"
        )
    lo, hi = float(a.min()), float(a.max())
    if (
        not (math.isfinite(lo) and math.isfinite(hi))
        or lo < -1 - _RANGE_SLACK
        or hi > 1 + _RANGE_SLACK
    ):
        raise DataError(
            f"{path} has values in [{lo:g}, {hi:g}]; expected floats in [-1, 1] (rescale: "
            "2 * x - 1 for [0, 1] data, x / 127.5 - 1 for [0, 255]) or a uint8 array"
        )
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).clamp(-1, 1)


def load_dataset(source: str | Path, size: int | None = None, channels: int = 3) -> torch.Tensor:
    """ "digits", an image folder (resized to `size`, default 64, with `channels`) or a
    .npy/.npz file: (N, C, H, W) float32 in [-1, 1]."""
    if str(source) == "digits":
        return digits(size or 16)
    path = Path(source)
    if path.is_dir():
        return image_folder(path, size or 64, channels)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        if not path.is_file():
            raise DataError(f"array file {path} does not exist")
        x = array_file(path)
        if size is not None and x.shape[-2:] != (size, size):
            raise DataError(f"{path} holds {tuple(x.shape[-2:])} images but size={size} was asked")
        return x
    if not path.exists():
        raise DataError(
            f"dataset {source!s} not found: expected 'digits', an image folder or a .npy/.npz file"
        )
    raise DataError(
        f"cannot use {path} as a dataset: expected 'digits', a folder of "
        f"{'/'.join(IMAGE_SUFFIXES)} images or a {' or '.join(ARRAY_SUFFIXES)} file"
    )


DATA_STREAM, NOISE_STREAM = 0, 1


def stream_seed(seed: int, stream: int, index: int) -> int:
    """A generator seed for item `index` of random stream `stream` of a run seeded `seed`
    (hashes of int tuples are the same in every Python process)."""
    return hash((seed, stream, index)) & (2**63 - 1)


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """The dataset indices of global batch `step`: epochs of a fresh permutation each (seeded by
    (seed, epoch)), read in order. A pure function of its arguments, so resuming and splitting a
    batch across processes see exactly the batches an uninterrupted single process sees."""
    start, out = step * batch, []
    while batch > 0:
        epoch, offset = divmod(start, n)
        g = torch.Generator().manual_seed(stream_seed(seed, DATA_STREAM, epoch))
        take = min(batch, n - offset)
        out.append(torch.randperm(n, generator=g)[offset : offset + take])
        start, batch = start + take, batch - take
    return torch.cat(out)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1], each enlarged `scale` times (nearest neighbour),
    into one uint8 image (rows*H', cols*W', C) with `pad` grey pixels between tiles; `nrow`
    images per row (default: about square)."""
    images = to_uint8(x).repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[top : top + h, left : left + w] = images[i]
    return out


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write (H, W), (H, W, 1) grey or (H, W, 3) RGB uint8 as an 8-bit PNG (no dependency)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    h, w, c = image.shape
    if c == 4:
        image, c = np.ascontiguousarray(image[..., :3]), 3
    if c not in (1, 3):
        raise ValueError(f"write_png takes 1 or 3 channels, got shape {image.shape}")

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * c)], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def save_grid(
    x: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None
) -> Path:
    """Write samples (N, C, H, W) in [-1, 1] as one PNG grid; `scale` enlarges each image
    (default: the smallest factor that makes it at least 48 pixels high)."""
    scale = scale or max(1, math.ceil(48 / x.shape[-2]))
    return write_png(path, grid(x, nrow, scale=scale))
