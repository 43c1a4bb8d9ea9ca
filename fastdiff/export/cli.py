"""`fastdiff export`: a model (default: the shipped digits model) -> .onnx, checked against
PyTorch with onnxruntime, optionally -> a TensorRT .engine where tensorrt is installed.

Hooked into fastdiff/cli.py with add_export_parser(subparsers)."""

from __future__ import annotations

import argparse


def _batch_range(s: str) -> tuple[int, int, int]:
    try:
        v = tuple(int(p) for p in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX integers, got {s!r}") from None
    if len(v) != 3 or not 1 <= v[0] <= v[1] <= v[2]:
        raise argparse.ArgumentTypeError(f"need MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got {s}")
    return v


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX (and a TensorRT engine where tensorrt is installed)",
        description=(
            "Export a model (default: the digits model shipped with fastdiff) to ONNX with a "
            "dynamic batch axis, check it with onnx.checker and against TensorRT's supported ops, "
            "run it in onnxruntime against PyTorch, and print the opset, the inputs and outputs "
            "and the max error. --engine also builds a TensorRT engine (needs tensorrt)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", metavar="PATH", default=None, help="model file or checkpoint dir")
    p.add_argument("--out", metavar="PATH", required=True, help="the .onnx file to write")
    p.add_argument("--batch", type=int, default=2, help="example batch size used for tracing")
    p.add_argument("--static-batch", action="store_true", help="fix the batch axis to --batch")
    p.add_argument("--dynamic-spatial", action="store_true", help="make H and W dynamic too")
    p.add_argument("--fp16", action="store_true", help="float16 weights and sample")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18)")
    p.add_argument("--include-step", action="store_true", help="export a whole sampler step")
    p.add_argument("--sampler", default=None, help="sampler for --include-step")
    p.add_argument("--steps", type=int, default=None, help="steps for --include-step")
    p.add_argument("--atol", type=float, default=1e-4, help="max error vs PyTorch (fp32)")
    p.add_argument("--engine", metavar="PATH", default=None, help="also build a TensorRT engine")
    p.add_argument(
        "--batch-range",
        type=_batch_range,
        default=(1, 2, 8),
        metavar="MIN,OPT,MAX",
        help="the engine's optimization profile for the batch axis",
    )
    p.set_defaults(run=run_export)
    return p


def run_export(args) -> int:
    import torch

    from fastdiff import checkpoints
    from fastdiff.export import DEFAULT_OPSET, OnnxStepRunner, to_onnx
    from fastdiff.export.tensorrt import build_engine, profiles_from_shapes

    if args.out and not str(args.out).endswith(".onnx"):
        raise ValueError(f"--out must be a .onnx file, got {args.out}")
    ckpt = checkpoints.load(args.model)
    dtype = torch.float16 if args.fp16 else torch.float32
    opset = args.opset or DEFAULT_OPSET
    common = dict(
        batch=args.batch,
        dynamic_batch=not args.static_batch,
        dynamic_spatial=args.dynamic_spatial,
        dtype=dtype,
        opset=opset,
        sample_shape=tuple(ckpt.sample_shape),
    )
    if args.include_step:
        sampler = args.sampler or ckpt.default_sampler
        steps = args.steps or ckpt.default_steps
        result = to_onnx(
            ckpt.model,
            args.out,
            include_step=True,
            sampler=sampler,
            steps=steps,
            schedule=ckpt.schedule,
            prediction=ckpt.prediction,
            **common,
        )
        import fastdiff

        shape = (1, *ckpt.sample_shape)
        with torch.no_grad():
            want = fastdiff.sample(
                ckpt.model.float(),
                shape,
                sampler=sampler,
                steps=steps,
                schedule=ckpt.schedule,
                prediction=ckpt.prediction,
            )
        got = OnnxStepRunner(result.path).sample(shape)
        result.max_error = (got - want).abs().max().item()
        if not args.fp16 and result.max_error > args.atol * max(1.0, want.abs().max().item()):
            raise RuntimeError(
                f"the step graph's samples differ from fastdiff.sample by {result.max_error:.3g}"
            )
    else:
        result = to_onnx(ckpt.model, args.out, verify=True, atol=args.atol, **common)
    print(result.summary())
    print(f"op types: {', '.join(result.op_types)} (all supported by TensorRT's ONNX parser)")
    if args.engine:
        axes = {} if args.static_batch else {"batch": args.batch_range}
        profile = profiles_from_shapes(result.path, axes)
        engine = build_engine(result.path, args.engine, fp16=args.fp16, profiles=[profile])
        print(f"wrote {engine} (TensorRT, profile {profile})")
    return 0
