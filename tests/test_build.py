"""fastdiff._C: it built (with CUDA where possible), says how, and its smoke op axpby works."""

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fastdiff import _ext
from fastdiff.ops import _library

pytestmark = pytest.mark.gpu  # scripts/gpu_check.sh's test phase

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INFO_FIELDS = {
    "compiler": str,
    "compiler_version": str,
    "cxx_standard": str,
    "cxx_flags": list,
    "cuda": bool,
    "cuda_version": (str, type(None)),
    "cuda_arch_list": (list, type(None)),
    "nvcc_flags": (list, type(None)),
    "openmp": bool,
    "openmp_max_threads": (int, type(None)),
    "torch_version": str,
    "ops": list,
}


def axpby(x, y, a, b):
    return torch.ops.fastdiff.axpby(x, y, a, b)


def test_extension_imports():
    assert _ext.available()
    assert callable(_ext.load().build_info)


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setitem(sys.modules, "fastdiff._C", None)
    with pytest.raises(ImportError, match=re.escape("pip install -e . --no-build-isolation")):
        _ext.load()
    assert not _ext.available()


def test_build_info_fields():
    info = _ext.build_info()
    assert set(info) == set(INFO_FIELDS)
    for key, kind in INFO_FIELDS.items():
        assert isinstance(info[key], kind), (key, info[key])
    assert info["torch_version"] == torch.__version__
    assert info["openmp"] and info["openmp_max_threads"] >= 1
    assert "-O3" in info["cxx_flags"]


def test_cuda_compiled_in_when_buildable():
    """True means the .cu sources compiled and linked; only FASTDIFF_NO_CUDA=1, a CPU torch or a
    machine without nvcc may give False."""
    info = _ext.build_info()
    buildable = (
        os.environ.get("FASTDIFF_NO_CUDA") != "1"
        and torch.version.cuda is not None
        and (shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME")))
    )
    assert info["cuda"] == buildable, info
    if info["cuda"]:
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
        assert info["cuda_arch_list"]
        assert "--use_fast_math" not in info["nvcc_flags"]


def test_axpby_registered():
    assert "fastdiff::axpby" in _ext.build_info()["ops"]
    assert _library.has_op("axpby")
    assert not _library.has_op("no_such_op")


def test_register_fake_skips_missing_op():
    fn = lambda x: x
    assert _library.register_fake("no_such_op")(fn) is fn


def test_kernels_package_maps_to_repo_folder():
    import fastdiff.kernels

    assert Path(next(iter(fastdiff.kernels.__path__))).resolve() == ROOT / "kernels"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_axpby_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(1823, generator=gen).to(device, dtype) for _ in range(2))
    a, b = 0.7, -1.3
    exact = a * x.double() + b * y.double()
    out = axpby(x, y, a, b)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    # DESIGN.md: within 2x the error of PyTorch itself in the same precision, plus a small floor.
    torch_err = (a * x + b * y).double().sub(exact).abs().max().item()
    err = out.double().sub(exact).abs().max().item()
    assert err <= 2 * torch_err + 1e-6, (err, torch_err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_axpby_cuda_matches_cpu_bitwise(dtype):
    x, y = (torch.randn(1823).to(dtype) for _ in range(2))
    torch.testing.assert_close(
        axpby(x.cuda(), y.cuda(), 0.7, -1.3).cpu(), axpby(x, y, 0.7, -1.3), rtol=0, atol=0
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_axpby_opcheck(device, dtype):
    x, y = (torch.randn(7, 97, device=device, dtype=dtype) for _ in range(2))
    torch.library.opcheck(torch.ops.fastdiff.axpby.default, (x, y, 0.5, 2.0))


def test_axpby_empty():
    assert axpby(torch.empty(0), torch.empty(0), 1.0, 1.0).shape == (0,)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.ones(4), torch.ones(5), r"y must have the shape of x \[4\], got \[5\]"),
        (torch.ones(4, 3).t(), torch.ones(3, 4), r"x must be contiguous .*call \.contiguous\(\)"),
        (
            torch.ones(4, dtype=torch.float64),
            torch.ones(4, dtype=torch.float64),
            "x must be a float32, float16 or bfloat16 tensor, got Double",
        ),
        (
            torch.ones(4, dtype=torch.int32),
            torch.ones(4, dtype=torch.int32),
            "x must be a float32, float16 or bfloat16 tensor, got Int",
        ),
        (
            torch.ones(4),
            torch.ones(4, dtype=torch.float16),
            r"y must have the dtype of x \(Float\), got Half",
        ),
    ],
)
def test_axpby_bad_inputs(x, y, message):
    with pytest.raises(RuntimeError, match="fastdiff::axpby: " + message):
        axpby(x, y, 1.0, 1.0)
