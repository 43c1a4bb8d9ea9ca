"""ONNX export of fastdiff denoisers (fastdiff UNets, diffusers UNets through the adapter, any
module called as model(x, t, **cond)) and of whole sampler steps (step_graph.py).

How the fused ops become standard ONNX: torch.onnx's dynamo exporter traces the model once
(torch.export, the model's own code) with torch.ops.fastdiff.attention and
torch.ops.fastdiff.group_norm_silu as opaque nodes, then decomposes ops that have no ONNX
translation with torch's decomposition table. DECOMPOSITIONS below holds ONE decomposition per
fused op (its reference formula in aten ops), registered in that table once, at import; so
attention becomes MatMul/Softmax and GroupNorm+SiLU becomes InstanceNormalization, Mul/Add and
Sigmoid. torch.export's own run_decompositions() and torch.compile keep the ops opaque
(decomposition_table() gives the table for an explicit ep.run_decompositions).

Opset: DEFAULT_OPSET = 18. TensorRT's ONNX parser (TensorRT 10.x) reads opsets up to 20 or
more and TensorRT 8.6 up to 17; 18 is the oldest opset torch's dynamo exporter emits natively
(lower ones go through onnx's version converter, which fails on some nodes), and at 18-20
attention and GroupNorm lower to MatMul/Softmax and InstanceNormalization, which every
TensorRT 8.6+/10.x parser supports (opset 21 GroupNormalization and opset 23 Attention need a
recent TensorRT). Lower opsets are refused with a clear error where onnx's version converter
cannot reach them (opset 17 fails on Pad for the UNets here), so TensorRT 8.6 is not a target.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastdiff.export.trt_ops import TENSORRT_SUPPORTED_OPS
from fastdiff.ops import attention as _attention_mod  # noqa: F401  (registers the op)
from fastdiff.ops import group_norm_silu as _gns_mod  # noqa: F401

DEFAULT_OPSET = 18
INPUT_NAMES = ("sample", "timestep", "context", "class_labels")
OUTPUT_NAME = "prediction"


# -- the one decomposition per fused op --------------------------------------------------------


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _attention_decomposition(q, k, v, scale, backend=None):
    """fastdiff.ops.attention_reference in aten ops: fp32 scores, softmax, fp32 output cast."""
    acc = _acc(q)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v.to(acc)).to(q.dtype)


def _group_norm_silu_decomposition(
    x, num_groups, weight, bias, eps, scale_shift, residual, backend=None
):
    """fastdiff.ops.group_norm_silu_reference without its out-copy: statistics in fp32."""
    acc = _acc(x)
    h = x.to(acc)
    extra = [1] * (x.dim() - 2)
    if residual is not None:
        r = residual.to(acc)
        h = h + (r if r.dim() == x.dim() else r.reshape(*r.shape, *extra))
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    y = torch.nn.functional.group_norm(h, num_groups, w, b, eps)
    if scale_shift is not None:
        scale, shift = scale_shift.to(acc).reshape(*scale_shift.shape, *extra).chunk(2, dim=1)
        y = y * (1 + scale) + shift
    return torch.nn.functional.silu(y).to(x.dtype)


DECOMPOSITIONS: dict[Any, Any] = {
    torch.ops.fastdiff.attention.default: _attention_decomposition,
    torch.ops.fastdiff.group_norm_silu.default: _group_norm_silu_decomposition,
}


def decomposition_table() -> dict:
    """torch.export's default decompositions plus DECOMPOSITIONS (the fused ops), for
    ExportedProgram.run_decompositions."""
    table = torch.export.default_decompositions()
    table.update(DECOMPOSITIONS)
    return table


def _register_decompositions() -> None:
    """Register DECOMPOSITIONS once in torch's decomposition table, the table torch.onnx's
    dynamo exporter consults for ops without an ONNX translation. torch.compile/inductor pick
    their decompositions from fixed lists, so the fused ops stay opaque everywhere else."""
    from torch._decomp import decomposition_table as table
    from torch._decomp import register_decomposition

    for op, fn in DECOMPOSITIONS.items():
        if op not in table:
            register_decomposition(op)(fn)


_register_decompositions()


# -- errors -------------------------------------------------------------------------------------


class UnsupportedOpError(ValueError):
    """The exported graph holds an op type TensorRT's ONNX parser does not support."""


class OutputMismatchError(RuntimeError):
    """onnxruntime's output differs from PyTorch's beyond the tolerance."""


# -- export -------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportResult:
    path: Path
    opset: int
    inputs: dict[str, tuple]  # name -> shape (str for a dynamic axis)
    outputs: dict[str, tuple]
    op_types: list[str]
    max_error: float | None = None  # vs PyTorch, measured with onnxruntime when verify=True

    def summary(self) -> str:
        fmt = lambda d: ", ".join(f"{k} {list(v)}" for k, v in d.items())
        err = (
            "" if self.max_error is None else f"; max |onnxruntime - torch| = {self.max_error:.3g}"
        )
        return (
            f"wrote {self.path} (opset {self.opset}); inputs: {fmt(self.inputs)}; "
            f"outputs: {fmt(self.outputs)}{err}"
        )


class _Denoiser(nn.Module):
    """model(sample, timestep, context=, class_labels=) with the conditions as named inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, context=None, class_labels=None):
        cond = {}
        if context is not None:
            cond["context"] = context
        if class_labels is not None:
            cond["class_labels"] = class_labels
        out = self.model(sample, timestep, **cond)
        if not isinstance(out, torch.Tensor):  # tuple or diffusers output class
            out = out[0] if isinstance(out, tuple | list) else out.sample
        return out


def as_model(model: nn.Module) -> nn.Module:
    """A fastdiff model: diffusers UNets are wrapped with fastdiff.adapters.diffusers.wrap."""
    if type(model).__name__ in ("UNet2DModel", "UNet2DConditionModel"):
        from fastdiff.adapters.diffusers import wrap

        return wrap(model)
    return model


def model_io(model: nn.Module) -> dict:
    """What the model takes: sample (C, H, W), context (L, D) or None, class-conditional, from
    a fastdiff UNet's config or a diffusers UNet's (through DiffusersDenoiser.config)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    info: dict[str, Any] = {}
    size = get("sample_size")
    if isinstance(size, int):
        size = (size, size)
    if get("in_channels") is not None and size is not None:
        info["sample_shape"] = (int(get("in_channels")), *map(int, size))
    ctx = get("context_dim") if get("context_dim") is not None else None
    if ctx is None and type(getattr(model, "unet", None)).__name__ == "UNet2DConditionModel":
        ctx = get("cross_attention_dim")
    if ctx is not None:
        info["context_shape"] = (77, int(ctx))
    n = get("num_classes") if get("num_classes") is not None else get("num_class_embeds")
    if n:
        info["num_classes"] = int(n)
    return info


def example_inputs(
    model: nn.Module,
    batch: int,
    *,
    sample_shape=None,
    context_shape=None,
    class_labels: bool | None = None,
    dtype=torch.float32,
    device=None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random named inputs {sample, timestep[, context][, class_labels]} for the model."""
    info = model_io(model)
    sample_shape = tuple(sample_shape or info.get("sample_shape") or ())
    if not sample_shape:
        raise ValueError("pass sample_shape=(C, H, W): the model has no config to read it from")
    context_shape = context_shape or info.get("context_shape")
    g = torch.Generator().manual_seed(seed)
    out = {
        "sample": torch.randn(batch, *sample_shape, generator=g).to(device, dtype),
        "timestep": (torch.rand(batch, generator=g) * 999).to(device, torch.float32),
    }
    if context_shape is not None:
        out["context"] = torch.randn(batch, *context_shape, generator=g).to(device, dtype)
    if class_labels if class_labels is not None else "num_classes" in info:
        n = info.get("num_classes", 10)
        out["class_labels"] = torch.randint(0, n, (batch,), generator=g).to(device)
    return out


def _dynamic_shapes(inputs: dict[str, torch.Tensor], dynamic_batch, dynamic_spatial, batch_dim):
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=4096)
    spec = {}
    for name, t in inputs.items():
        axes: dict[int, Any] = {}
        if dynamic_batch and t.dim() > 0 and name in batch_dim:
            axes[batch_dim[name]] = batch
        if dynamic_spatial and name in ("sample", "x", "noise", "history"):
            first = batch_dim[name] + 2
            for i in range(first, t.dim()):
                axes[i] = Dim.AUTO
        spec[name] = axes or None
    return spec


def _rename_axes(proto, names_by_input: dict[str, dict[int, str]]) -> None:
    """Give the dynamic axes readable names (batch, height, width) everywhere they appear."""
    rename = {}
    for vi in proto.graph.input:
        for i, name in names_by_input.get(vi.name, {}).items():
            d = vi.type.tensor_type.shape.dim[i]
            if d.dim_param and d.dim_param not in rename:
                rename[d.dim_param] = name
    values = [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]
    for vi in values:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in rename:
                d.dim_param = rename[d.dim_param]


def _shapes(values) -> dict[str, tuple]:
    return {
        v.name: tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
        for v in values
    }


def check_tensorrt_ops(proto_or_path) -> list[str]:
    """The graph's op types (sorted); raises UnsupportedOpError naming any outside
    TENSORRT_SUPPORTED_OPS (and the nodes using them)."""
    import onnx

    proto = (
        onnx.load(str(proto_or_path)) if isinstance(proto_or_path, str | Path) else proto_or_path
    )
    nodes = list(proto.graph.node)
    for fn in proto.functions:
        nodes += list(fn.node)
    types = sorted({n.op_type for n in nodes if n.domain in ("", "ai.onnx")})
    custom = sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in ("", "ai.onnx")})
    bad = [t for t in types if t not in TENSORRT_SUPPORTED_OPS] + custom
    if bad:
        where = [n.name for n in nodes if n.op_type in bad or f"{n.domain}::{n.op_type}" in bad]
        raise UnsupportedOpError(
            f"the ONNX graph uses ops TensorRT's parser does not support: {bad} (nodes "
            f"{where[:5]}{'...' if len(where) > 5 else ''}). Export with another opset, replace "
            "the layer producing them, or register a decomposition for it in "
            "fastdiff.export.onnx.DECOMPOSITIONS"
        )
    return types


def export_module(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    path,
    *,
    output_names,
    batch_dim: dict[str, int],
    dynamic_batch: bool,
    dynamic_spatial: bool,
    opset: int,
    metadata: dict[str, str] | None = None,
    check_ops: bool = True,
) -> ExportResult:
    """torch.export -> fused-op decompositions -> torch.onnx (dynamo) -> shape inference,
    onnx.checker and the TensorRT op check. `inputs` are keyword arguments of module.forward,
    in the order of the ONNX inputs."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dyn = _dynamic_shapes(inputs, dynamic_batch, dynamic_spatial, batch_dim)
    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # every batched input shares the one "batch" Dim; torch.onnx notes that it renames once
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        # torch.onnx traces the module once (torch.export) and decomposes it with torch's table,
        # where the fused ops' DECOMPOSITIONS are registered
        program = torch.onnx.export(
            module,
            (),
            kwargs=inputs,
            dynamic_shapes=dyn,
            dynamo=True,
            opset_version=opset,
            input_names=list(inputs),
            output_names=list(output_names),
            external_data=False,
            optimize=True,  # constant folding and dead-code elimination (onnxscript optimizer)
        )
    proto = program.model_proto
    axis_names = {}
    for name in inputs:
        axes = {}
        if dynamic_batch and name in batch_dim:
            axes[batch_dim[name]] = "batch"
        if dynamic_spatial and name in ("sample", "x", "noise", "history"):
            axes[batch_dim[name] + 2] = "height"
            axes[batch_dim[name] + 3] = "width"
        axis_names[name] = axes
    _rename_axes(proto, axis_names)
    actual = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if actual != opset:
        raise ValueError(
            f"opset {opset} was asked for but torch.onnx produced opset {actual} (onnx's version "
            f"converter cannot convert every node to {opset}); use opset={actual} or higher. "
            "TensorRT 10's ONNX parser reads opset 18"
        )
    first = proto.graph.input[0]
    if (
        dynamic_batch
        and first.type.tensor_type.shape.dim[batch_dim[first.name]].dim_param != "batch"
    ):
        raise ValueError(
            "the exported graph has a fixed batch size although dynamic_batch=True: the model "
            "makes torch.export specialize the batch axis (e.g. chunk() or a Python int from "
            "x.shape); fix the model code or pass dynamic_batch=False"
        )
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    onnx.checker.check_model(proto, full_check=True)
    types = (
        check_tensorrt_ops(proto) if check_ops else sorted({n.op_type for n in proto.graph.node})
    )
    onnx.save(proto, str(path))
    return ExportResult(path, opset, _shapes(proto.graph.input), _shapes(proto.graph.output), types)


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch: int = 2,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    dtype: torch.dtype = torch.float32,
    opset: int = DEFAULT_OPSET,
    sample_shape: tuple[int, ...] | None = None,
    context_shape: tuple[int, int] | None = None,
    class_labels: bool | None = None,
    include_step: bool = False,
    sampler: str = "ddim",
    steps: int = 20,
    guidance_scale: float | None = None,
    schedule=None,
    verify: bool = False,
    atol: float = 1e-4,
    check_ops: bool = True,
    **plan_options,
) -> ExportResult:
    """Export `model` (model(x, t, **cond): fastdiff UNet, diffusers UNet2D(Condition)Model, or
    a DiffusersDenoiser) to ONNX at `path`.

    Inputs: sample (B, C, H, W) in `dtype`, timestep (B,) float32, context (B, L, D) for
    cross-attention models, class_labels (B,) int64 for class-conditional ones; output:
    prediction, shaped like sample. Shapes default to the model's config (context length 77);
    the batch axis is dynamic unless dynamic_batch=False, H and W when dynamic_spatial=True
    (both must stay divisible by the UNet's total downsampling). Weights are cast to `dtype`
    (float32 or float16). With include_step=True the graph is a whole sampler step instead (see
    fastdiff.export.step_graph.StepGraph): inputs x, step, [cond], noise[, history]; outputs
    x_next[, new_history]; `schedule` (default: linear betas), `spacing`, `prediction` and
    `eta` choose the plan as in fastdiff.sample. verify=True runs the file in onnxruntime
    against PyTorch at batch 1 and `batch` and raises OutputMismatchError beyond `atol` (fp32;
    20x looser for fp16)."""
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    model = as_model(model)
    if next(model.parameters()).dtype != dtype:  # cast a copy: the caller's model stays as it is
        model = copy.deepcopy(model).to(dtype)
    model = model.eval()
    device = next(model.parameters()).device
    inputs = example_inputs(
        model,
        batch,
        sample_shape=sample_shape,
        context_shape=context_shape,
        class_labels=class_labels,
        dtype=dtype,
        device=device,
    )
    if include_step:
        from fastdiff.export.step_graph import export_step

        return export_step(
            model,
            inputs,
            path,
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance_scale,
            schedule=schedule,
            dynamic_batch=dynamic_batch,
            dynamic_spatial=dynamic_spatial,
            opset=opset,
            check_ops=check_ops,
            **plan_options,
        )
    result = export_module(
        _Denoiser(model),
        inputs,
        path,
        output_names=[OUTPUT_NAME],
        batch_dim={k: 0 for k in inputs},
        dynamic_batch=dynamic_batch,
        dynamic_spatial=dynamic_spatial,
        opset=opset,
        metadata={"fastdiff.kind": "denoiser"},
        check_ops=check_ops,
    )
    if verify:
        tol = atol if dtype == torch.float32 else 20 * atol
        batches = sorted({1, batch}) if dynamic_batch else [batch]
        result.max_error = verify_onnx(result.path, model, batches=batches, atol=tol, ref=inputs)
    return result


def verify_onnx(path, model, *, batches=(1, 3), atol=1e-4, ref=None, seed=1) -> float:
    """Max |onnxruntime - PyTorch| over random inputs at each batch size; raises
    OutputMismatchError when it exceeds atol."""
    from fastdiff.export.runners import OnnxRunner

    runner = OnnxRunner(path)
    model = as_model(model).eval()
    p = next(model.parameters())
    worst = 0.0
    for b in batches:
        kwargs = {}
        if ref is not None:
            info = {k: tuple(v.shape[1:]) for k, v in ref.items()}
            kwargs = {
                "sample_shape": info["sample"],
                "context_shape": info.get("context"),
                "class_labels": "class_labels" in ref,
            }
        inp = example_inputs(model, b, dtype=p.dtype, device=p.device, seed=seed + b, **kwargs)
        x, t = inp.pop("sample"), inp.pop("timestep")
        with torch.no_grad():
            want = _Denoiser(model)(x, t, **inp)
        got = runner(x, t, **inp)
        err = (got.float() - want.float()).abs().max().item()
        worst = max(worst, err)
        if not err <= atol:
            raise OutputMismatchError(
                f"{path}: onnxruntime output differs from PyTorch by {err:.3g} > {atol:g} at batch "
                f"{b}; check custom layers (an op without a faithful decomposition), the dtype, "
                "or pass a looser atol if this is expected (e.g. fp16)"
            )
    return worst
