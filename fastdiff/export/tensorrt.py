"""TensorRT engines from the exported ONNX graphs, written against the TensorRT 10 Python API
(tensorrt.Builder, OnnxParser, optimization profiles, timing cache; Runtime, execute_async_v3).

The TensorRT builder cannot be installed on the machines this project is developed on, so this
file is not exercised there: its tests skip with the reason. profiles_from_shapes (pure Python,
from the ONNX graph) is tested everywhere."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


class TensorRTUnavailableError(ImportError, RuntimeError):
    pass


class ShapeOutsideProfileError(ValueError):
    pass


def import_tensorrt():
    """The tensorrt module, or TensorRTUnavailableError saying what to install."""
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailableError(
            "tensorrt is not importable: building engines needs the full TensorRT library "
            "(e.g. `pip install tensorrt` from NVIDIA's index, on a machine with an NVIDIA GPU "
            "and driver); running prebuilt engines needs at least tensorrt-lean. The ONNX "
            f"file itself works with onnxruntime (fastdiff.export.OnnxRunner). ({e})"
        ) from e
    return tensorrt


def _onnx_inputs(onnx_path) -> dict[str, list]:
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in proto.graph.input
        if v.name not in inits
    }


def profiles_from_shapes(
    onnx_path, axes: Mapping[str, tuple[int, int, int] | int] | None = None, **kw
) -> Profile:
    """One optimization profile {input: (min, opt, max)} for the graph at onnx_path, from the
    (min, opt, max) the user gives each named dynamic axis, e.g. batch=(1, 2, 8),
    height=(32, 64, 96). An int fixes the axis. Fixed axes of the graph are kept; a dynamic axis
    without a range, an unknown axis name or min <= opt <= max not holding raises ValueError."""
    ranges = dict(axes or {}, **kw)
    for name, r in list(ranges.items()):
        r = (r, r, r) if isinstance(r, int) else tuple(int(v) for v in r)
        if len(r) != 3 or not 1 <= r[0] <= r[1] <= r[2]:
            raise ValueError(
                f"axis {name!r}: need (min, opt, max) with 1 <= min <= opt <= max, got {r}"
            )
        ranges[name] = r
    inputs = _onnx_inputs(onnx_path)
    used, profile = set(), {}
    for inp, dims in inputs.items():
        shapes = ([], [], [])
        for i, d in enumerate(dims):
            if isinstance(d, str) or d == 0:
                if d not in ranges:
                    raise ValueError(
                        f"input {inp!r} axis {i} is dynamic ({d!r}): give its range, e.g. "
                        f"{d or 'axis'}=(min, opt, max)"
                    )
                used.add(d)
                for s, v in zip(shapes, ranges[d]):
                    s.append(v)
            else:
                for s in shapes:
                    s.append(int(d))
        profile[inp] = tuple(tuple(s) for s in shapes)
    unknown = sorted(set(ranges) - used)
    if unknown:
        dynamic = sorted({d for dims in inputs.values() for d in dims if isinstance(d, str)})
        raise ValueError(f"axes {unknown} are not dynamic axes of {onnx_path}; its axes: {dynamic}")
    return profile


def check_in_profile(profile: Profile, shapes: Mapping[str, Shape]) -> None:
    """ShapeOutsideProfileError naming the input and the allowed range, for any shape outside
    profile's [min, max]."""
    for name, shape in shapes.items():
        if name not in profile:
            continue
        lo, _, hi = profile[name]
        shape = tuple(shape)
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            raise ShapeOutsideProfileError(
                f"input {name!r} has shape {shape}, outside the engine's profile (min {lo}, max "
                f"{hi}); rebuild the engine with a profile covering it (build_engine(profiles=...))"
            )


def build_engine(
    onnx_path,
    engine_path,
    *,
    fp16: bool = False,
    profiles: Sequence[Profile] | None = None,
    workspace_bytes: int | None = None,
    timing_cache: str | Path | None = None,
) -> Path:
    """Parse onnx_path with TensorRT's OnnxParser, build a serialized engine with one
    optimization profile per entry of `profiles` ({input: (min, opt, max)}; see
    profiles_from_shapes) and write it to engine_path. A timing cache file is read if present
    and written back."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ValueError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors))
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.exists() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    dynamic = [
        network.get_input(i).name
        for i in range(network.num_inputs)
        if any(d < 0 for d in network.get_input(i).shape)
    ]
    if dynamic and not profiles:
        raise ValueError(
            f"inputs {dynamic} have dynamic axes: pass profiles=[profiles_from_shapes(onnx_path, "
            "batch=(min, opt, max))]"
        )
    for prof in profiles or []:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log)")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    if cache_path:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


class TensorRTRunner:
    """A serialized engine as a fastdiff model: runner(x, t, **cond) -> prediction on x's CUDA
    device. Inputs are bound as torch CUDA tensors (no copies when dtype and layout match);
    with cuda_graph=True, the engine's launch is captured as a CUDA graph the first time a
    shape set repeats, and replayed while the shapes stay the same."""

    def __init__(self, engine_path, *, device: str | torch.device = "cuda", cuda_graph=True):
        trt = import_tensorrt()
        self.trt, self.device = trt, torch.device(device)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"could not deserialize {engine_path} (TensorRT version mismatch?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if mode(n) != trt.TensorIOMode.INPUT]
        self.dtypes = {n: self._torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.profile = {
            n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0))
            for n in self.inputs
            if any(d < 0 for d in self.engine.get_tensor_shape(n))
        }
        self.use_graph = cuda_graph
        self._graph = self._static = self._static_out = self._key = None

    def _torch_dtype(self, dt):
        trt = self.trt
        table = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
        }
        return table[dt]

    def _launch(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outs = {}
        for n, t in feeds.items():
            self.context.set_input_shape(n, tuple(t.shape))
            self.context.set_tensor_address(n, t.data_ptr())
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            outs[n] = torch.empty(shape, dtype=self.dtypes[n], device=self.device)
            self.context.set_tensor_address(n, outs[n].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
        return outs

    def run(self, **named: torch.Tensor) -> dict[str, torch.Tensor]:
        missing = sorted(set(self.inputs) - set(named))
        if missing:
            raise ValueError(f"engine inputs {self.inputs}; missing {missing}")
        feeds = {n: named[n].to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}
        check_in_profile(self.profile, {n: t.shape for n, t in feeds.items()})
        if not self.use_graph:
            return self._launch(feeds)
        key = tuple((n, tuple(t.shape)) for n, t in feeds.items())
        if key != self._key:  # new shapes: run eagerly, capture on the next call with these
            self._key, self._graph, self._static = key, None, None
            return self._launch(feeds)
        if self._graph is None:
            self._static = {n: t.clone() for n, t in feeds.items()}
            self._launch(self._static)  # shape-dependent setup outside the capture
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._static_out = self._launch(self._static)
        for n, t in feeds.items():
            self._static[n].copy_(t)
        self._graph.replay()
        return {n: t.clone() for n, t in self._static_out.items()}

    def __call__(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        out = self.run(sample=x, timestep=t, **cond)[self.outputs[0]]
        return out.to(x.dtype)
