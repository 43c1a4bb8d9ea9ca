"""ONNX export (fastdiff UNets, a diffusers UNet, whole sampler steps), onnxruntime runners and
the TensorRT pieces that can be checked without TensorRT."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs onnxscript")

# onnxruntime writes a cache under XDG_CACHE_HOME: keep it out of the user's home, and remove
# it when the test process ends
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="fastdiff-export-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

import fastdiff  # noqa: E402
from fastdiff.export import (  # noqa: E402
    DEFAULT_OPSET,
    TENSORRT_SUPPORTED_OPS,
    OnnxRunner,
    OnnxStepRunner,
    OutputMismatchError,
    ShapeOutsideProfileError,
    UnsupportedOpError,
    check_tensorrt_ops,
    profiles_from_shapes,
    to_onnx,
    verify_onnx,
)
from fastdiff.export.onnx import example_inputs  # noqa: E402
from fastdiff.export.tensorrt import check_in_profile  # noqa: E402
from fastdiff.models.unet import UNet  # noqa: E402

pytestmark = pytest.mark.gpu  # scripts/gpu_check.sh's test phase

ATOL = 1e-4


@pytest.fixture(autouse=True)
def _reference_ops():
    # PyTorch side on the ops' reference formulas (the spec; fast on CPU, unlike interpreted
    # Triton kernels)
    with fastdiff.ops.use("reference"):
        yield


def _tiny_unet():
    """A digits-shaped UNet small enough to export in a few seconds (attention + GN+SiLU)."""
    torch.manual_seed(0)
    return UNet.from_preset("digits", channels=(16, 32), norm_groups=8).eval()


def _max_error(path, model, batches=(1, 3), **shapes):
    """onnxruntime vs PyTorch at each batch size, one file."""
    runner = OnnxRunner(path)
    errs = []
    for b in batches:
        inp = example_inputs(model, b, seed=10 + b, **shapes)
        x, t = inp.pop("sample"), inp.pop("timestep")
        with torch.no_grad():
            want = model(x, t, **inp)
        got = runner(x, t, **inp)
        assert got.shape == want.shape
        errs.append((got - want).abs().max().item())
    return errs


def _check_graph(path, names):
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == names
    assert [o.name for o in proto.graph.output] == ["prediction"]
    types = {n.op_type for n in proto.graph.node}
    assert types <= TENSORRT_SUPPORTED_OPS, types - TENSORRT_SUPPORTED_OPS
    # the fused ops became standard ops through their decompositions
    assert "MatMul" in types and "Softmax" in types and "InstanceNormalization" in types
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert proto.opset_import[0].version == DEFAULT_OPSET
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"
    return proto


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    torch.manual_seed(0)
    model = UNet.from_preset("digits").eval()
    path = tmp_path_factory.mktemp("export") / "digits.onnx"
    result = to_onnx(model, path, batch=2, verify=True)
    return model, path, result


def test_digits_matches_torch_at_batch_1_and_3(digits):
    model, path, result = digits
    _check_graph(path, ["sample", "timestep"])
    assert result.inputs["sample"] == ("batch", 1, 16, 16)
    assert result.max_error is not None and result.max_error <= ATOL
    errs = _max_error(path, model)
    assert max(errs) <= ATOL, errs


def test_ddpm_cifar10_preset(tmp_path):
    # the real preset (35.7M parameters, 143 MB of ONNX): ~35 s to export on a 2-core CPU
    torch.manual_seed(0)
    model = UNet.from_preset("ddpm-cifar10").eval()
    path = tmp_path / "cifar.onnx"
    to_onnx(model, path, batch=2)
    _check_graph(path, ["sample", "timestep"])
    errs = _max_error(path, model)
    assert max(errs) <= ATOL, errs


def test_diffusers_unet2d_condition_model(tmp_path):
    from diffusers import UNet2DConditionModel

    from fastdiff.adapters.diffusers import accelerate, wrap

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(40, 80),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
        layers_per_block=1,
    ).eval()
    model = accelerate(wrap(unet))  # fastdiff's fused attention and GroupNorm+SiLU inside
    path = tmp_path / "sd-tiny.onnx"
    to_onnx(model, path, batch=2, context_shape=(7, 24))
    _check_graph(path, ["sample", "timestep", "context"])
    errs = _max_error(path, model, context_shape=(7, 24))
    assert max(errs) <= ATOL, errs


def test_sampling_through_onnx_runner_equals_pytorch(digits):
    model, path, _ = digits
    runner = OnnxRunner(path)
    for sampler in ("dpmpp_2m", "euler_a"):
        kw = dict(sampler=sampler, steps=4, seed=3)
        with torch.no_grad():
            want = fastdiff.sample(model, (3, 1, 16, 16), **kw)
        got = fastdiff.sample(runner, (3, 1, 16, 16), **kw)
        # an untrained UNet drives samples to |x| ~ 1e2: compare relative to the magnitude
        assert (got - want).abs().max().item() <= ATOL * max(1.0, want.abs().max().item())


@pytest.mark.parametrize(
    "sampler, guided", [("ddim", False), ("dpmpp_2m", True), ("euler_a", False)]
)
def test_step_graph_reproduces_sample(tmp_path, sampler, guided):
    # dpmpp_2m: a cross-attention UNet with classifier-free guidance (cond and uncond batched
    # into one model call inside the graph) and a history tensor
    torch.manual_seed(0)
    extra = {"context_dim": 8} if guided else {}
    model = UNet.from_preset("digits", channels=(16, 32), norm_groups=8, **extra).eval()
    path = tmp_path / f"step-{sampler}.onnx"
    steps, shape, seed = 4, (3, 1, 16, 16), 5
    guidance = dict(guidance_scale=3.0, context_shape=(5, 8)) if guided else {}
    result = to_onnx(model, path, include_step=True, sampler=sampler, steps=steps, **guidance)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert set(result.op_types) <= TENSORRT_SUPPORTED_OPS
    names = [i.name for i in proto.graph.input]
    runner = OnnxStepRunner(path)
    assert names[:3] == ["x", "step", "noise"]
    assert ("history" in names) == (runner.n_history > 0) == (sampler == "dpmpp_2m")
    assert result.inputs["x"][0] == "batch"
    kw, cond = dict(sampler=sampler, steps=steps, seed=seed), {}
    if guided:
        c, u = torch.randn(3, 5, 8), torch.zeros(3, 5, 8)
        kw.update(cond={"context": c}, uncond={"context": u}, guidance_scale=3.0)
        cond = {"context": c, "uncond_context": u}
    with torch.no_grad():
        want = fastdiff.sample(model, shape, **kw)
    got = runner.sample(shape, seed=seed, cond=cond)
    tol = ATOL * max(1.0, want.abs().max().item())  # relative to the samples' magnitude
    assert (got - want).abs().max().item() <= tol
    # one file, another batch size: batch 1 equals the first sample of the batch of 3
    cond1 = {k: v[:1] for k, v in cond.items()}
    got1 = runner.sample((1, 1, 16, 16), seed=seed, cond=cond1)
    assert (got1[0] - want[0]).abs().max().item() <= tol


def test_fused_ops_stay_opaque_outside_onnx():
    # the decompositions are registered for torch.onnx only: torch.export keeps the fused ops
    from fastdiff.ops.attention import attention

    class Attn(torch.nn.Module):
        def forward(self, q):
            return attention(q, q, q)

    q = torch.randn(1, 2, 5, 8)
    ep = torch.export.export(Attn(), (q,)).run_decompositions()
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "fastdiff.attention.default" in targets


def test_fp16_with_dynamic_spatial_size(tmp_path):
    model = _tiny_unet()
    path = tmp_path / "tiny-fp16.onnx"
    result = to_onnx(model, path, dtype=torch.float16, batch=2, dynamic_spatial=True)
    assert result.inputs["sample"] == ("batch", 1, "height", "width")
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert proto.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert set(result.op_types) <= TENSORRT_SUPPORTED_OPS
    runner = OnnxRunner(path)
    assert next(model.parameters()).dtype == torch.float32  # exported from a copy
    for shape in ((2, 1, 16, 16), (1, 1, 24, 32)):
        x = torch.randn(shape)
        t = torch.rand(shape[0]) * 999
        with torch.no_grad():
            want = model(x, t)
        got = runner(x.half(), t)
        assert got.dtype == torch.float16 and got.shape == want.shape
        assert (got.float() - want).abs().max().item() < 2e-2


def test_unsupported_op_is_a_clear_error(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Unique", ["x"], ["y"], name="unique0")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(UnsupportedOpError, match=r"Unique.*unique0"):
        check_tensorrt_ops(path)


def test_output_mismatch_is_a_clear_error(digits):
    model, path, _ = digits
    other = UNet.from_preset("digits").eval()  # different random weights
    with pytest.raises(OutputMismatchError, match="differs from PyTorch"):
        verify_onnx(path, other, batches=(1,))
    assert verify_onnx(path, model, batches=(2,)) <= ATOL


def test_runner_rejects_wrong_inputs(digits):
    _, path, _ = digits
    with pytest.raises(ValueError, match="unexpected"):
        OnnxRunner(path)(torch.randn(1, 1, 16, 16), 5.0, context=torch.randn(1, 3, 4))


def test_profiles_from_user_shapes(digits):
    _, path, _ = digits
    prof = profiles_from_shapes(path, batch=(1, 4, 16))
    assert prof == {
        "sample": ((1, 1, 16, 16), (4, 1, 16, 16), (16, 1, 16, 16)),
        "timestep": ((1,), (4,), (16,)),
    }
    check_in_profile(prof, {"sample": (8, 1, 16, 16)})
    with pytest.raises(ShapeOutsideProfileError, match="outside the engine's profile"):
        check_in_profile(prof, {"sample": (17, 1, 16, 16)})
    with pytest.raises(ValueError, match="dynamic"):
        profiles_from_shapes(path)
    with pytest.raises(ValueError, match="not dynamic axes"):
        profiles_from_shapes(path, batch=(1, 2, 4), height=(8, 16, 32))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        profiles_from_shapes(path, batch=(4, 2, 1))


def _has_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


needs_trt = pytest.mark.skipif(
    not _has_tensorrt() or not torch.cuda.is_available(),
    reason="tensorrt is not importable (the builder cannot be installed on this machine) or no "
    "CUDA GPU: engine build and TensorRTRunner are not verified here",
)


@pytest.mark.skipif(_has_tensorrt(), reason="tensorrt is installed")
def test_missing_tensorrt_is_a_clear_error(digits, tmp_path):
    from fastdiff.export import TensorRTUnavailableError, build_engine

    _, path, _ = digits
    with pytest.raises(TensorRTUnavailableError, match="tensorrt is not importable"):
        build_engine(path, tmp_path / "x.engine", profiles=[profiles_from_shapes(path, batch=2)])


@needs_trt
def test_tensorrt_engine_matches_torch(digits, tmp_path):
    from fastdiff.export import TensorRTRunner, build_engine

    model, path, _ = digits
    engine = build_engine(
        path, tmp_path / "digits.engine", profiles=[profiles_from_shapes(path, batch=(1, 2, 4))]
    )
    runner = TensorRTRunner(engine)
    model = model.cuda()
    for b in (1, 3, 3, 3):  # the repeated shape goes through CUDA-graph replay
        x = torch.randn(b, 1, 16, 16, device="cuda")
        t = torch.full((b,), 100.0, device="cuda")
        with torch.no_grad():
            want = model(x, t)
        assert (runner(x, t) - want).abs().max().item() <= 1e-3
    with pytest.raises(ShapeOutsideProfileError):
        runner(torch.randn(5, 1, 16, 16, device="cuda"), 1.0)


def test_cli_export_step_graph(tmp_path, capsys):
    from fastdiff.cli import main

    out = tmp_path / "digits-step.onnx"
    argv = ["export", "--out", str(out), "--include-step", "--sampler", "ddim", "--steps", "3"]
    if not _has_tensorrt():
        argv += ["--engine", str(tmp_path / "digits.engine")]
    code = main(argv)
    text = capsys.readouterr()
    assert "opset 18" in text.out and "x_next" in text.out and "max |onnxruntime" in text.out
    # the shipped (trained) digits model keeps samples in range: an absolute 1e-4 holds
    err = float(text.out.split("max |onnxruntime - torch| = ")[1].split()[0])
    assert err <= ATOL
    if not _has_tensorrt():  # the ONNX file is written, then the engine step says what is missing
        assert code == 1 and "tensorrt is not importable" in text.err
        assert not (tmp_path / "digits.engine").exists()
    else:
        assert code == 0
    assert out.exists()
