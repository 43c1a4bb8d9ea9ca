import numpy as np
import pytest
import torch

from fastdiff import data

PIL = pytest.importorskip("PIL.Image")


def test_digits_shape_range_and_content():
    x = data.digits()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # the 16x16 images are the 8x8 originals upsampled: average-pooling nearly gives them back
    from sklearn.datasets import load_digits

    orig = torch.from_numpy(load_digits().images).float().flatten() / 8 - 1
    pooled = torch.nn.functional.avg_pool2d(x, 2).flatten()
    assert torch.corrcoef(torch.stack([pooled, orig]))[0, 1] > 0.95


def _png(path, array):
    PIL.fromarray(array).save(path)


def test_image_folder_resizes_and_center_crops(tmp_path):
    (tmp_path / "sub").mkdir()
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # the central square is white, the sides black
    _png(tmp_path / "sub" / "wide.png", wide)
    _png(tmp_path / "grey.jpg", np.full((9, 9), 128, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    x = data.image_folder(tmp_path, size=8, channels=3)
    assert x.shape == (2, 3, 8, 8)
    assert x.min() >= -1 and x.max() <= 1
    # sorted by path: grey.jpg, then sub/wide.png (cropped to its white centre)
    assert torch.allclose(x[0], torch.full_like(x[0], 128 / 127.5 - 1), atol=0.02)
    assert x[1][..., 1:-1].min() > 0.99 and x[1].min() > 0.5  # bicubic blurs the crop edge
    assert data.image_folder(tmp_path, size=4, channels=1).shape == (2, 1, 4, 4)


def test_image_folder_errors_name_the_file(tmp_path):
    with pytest.raises(data.DataError, match=f"{tmp_path}.*holds no images"):
        data.image_folder(tmp_path, 8)
    _png(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(data.DataError, match=r"cannot read image .*broken\.png"):
        data.image_folder(tmp_path, 8)


def test_array_files(tmp_path):
    u8 = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)  # NHWC
    np.save(tmp_path / "a.npy", u8)
    x = data.load_dataset(tmp_path / "a.npy")
    assert x.shape == (5, 3, 6, 6)
    assert torch.allclose(x, torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1)
    f = np.linspace(-1, 1, 5 * 36, dtype=np.float32).reshape(5, 6, 6)  # NHW
    np.savez(tmp_path / "b.npz", images=f, labels=np.arange(5))
    assert torch.equal(data.load_dataset(tmp_path / "b.npz")[:, 0], torch.from_numpy(f))


@pytest.mark.parametrize(
    "array, message",
    [
        (np.full((2, 4, 4), 3.0, np.float32), r"values in \[3, 3\]; expected floats in \[-1, 1\]"),
        (np.zeros((2, 4, 4), np.int32), "dtype int32"),
        (np.zeros((4, 4), np.uint8), r"shape \(4, 4\)"),
        (np.zeros((0, 1, 4, 4), np.uint8), "N > 0"),
        (np.full((2, 4, 4), np.nan, np.float32), "values in"),
    ],
)
def test_bad_arrays_name_the_file(tmp_path, array, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(data.DataError, match=message) as e:
        data.load_dataset(path)
    assert str(path) in str(e.value)


def test_dataset_source_errors(tmp_path):
    np.savez(tmp_path / "two.npz", x=np.zeros((2, 4, 4)), y=np.zeros((2, 4, 4)))
    with pytest.raises(data.DataError, match=r"two.npz holds arrays \['x', 'y'\]"):
        data.load_dataset(tmp_path / "two.npz")
    with pytest.raises(data.DataError, match=r"missing\.npy does not exist"):
        data.load_dataset(tmp_path / "missing.npy")
    with pytest.raises(data.DataError, match="nowhere not found"):
        data.load_dataset(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"cannot use .*weights\.bin as a dataset"):
        data.load_dataset(tmp_path / "weights.bin")
    (tmp_path / "corrupt.npy").write_bytes(b"garbage")
    with pytest.raises(data.DataError, match=r"cannot read array file .*corrupt\.npy"):
        data.load_dataset(tmp_path / "corrupt.npy")


def test_batches_are_one_stream_of_epoch_permutations():
    n = 10
    one = torch.cat([data.batch_indices(n, 1, s, seed=3) for s in range(40)])
    for b in (3, 7):
        batched = torch.cat([data.batch_indices(n, b, s, seed=3) for s in range(40 // b)])
        assert torch.equal(batched, one[: len(batched)])
    for epoch in range(4):  # every epoch visits every image once, in a fresh order
        assert sorted(one[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(one[:n], one[n : 2 * n])
    assert not torch.equal(data.batch_indices(n, n, 0, seed=4), one[:n])


def test_png_grid_round_trips_through_pillow(tmp_path):
    x = torch.rand(5, 3, 4, 6) * 2 - 1
    path = data.save_grid(x, tmp_path / "g.png", nrow=3, scale=1)
    img = np.asarray(PIL.open(path))
    assert img.shape == (2 * 5 + 1, 3 * 7 + 1, 3)  # 2 rows, 3 columns, 1-pixel borders
    tiles = data.to_uint8(x)
    assert np.array_equal(img[1:5, 1:7], tiles[0])
    assert np.array_equal(img[6:10, 8:14], tiles[4])
    assert (img[0] == 128).all() and (img[:, 7] == 128).all() and (img[6:, 15:] == 128).all()
    grey = PIL.open(data.save_grid(x[:2, :1], tmp_path / "grey.png", nrow=2))
    assert grey.mode == "L" and grey.size == (2 * 73 + 1, 48 + 2)  # 4x6 enlarged 12x
    assert np.array_equal(
        np.asarray(grey)[1:49, 1:73], tiles[0, ..., 0].repeat(12, 0).repeat(12, 1)
    )
