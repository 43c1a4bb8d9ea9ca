"""ONNX and TensorRT export of fastdiff denoisers and whole sampler steps.

result = fastdiff.export.to_onnx(model, "unet.onnx")        # dynamic batch, opset 18
y = fastdiff.export.OnnxRunner("unet.onnx")(x, t)            # a fastdiff model
fastdiff.export.build_engine("unet.onnx", "unet.engine", profiles=[...])   # needs tensorrt
"""

from fastdiff.export.onnx import (
    DECOMPOSITIONS,
    DEFAULT_OPSET,
    ExportResult,
    OutputMismatchError,
    UnsupportedOpError,
    check_tensorrt_ops,
    to_onnx,
    verify_onnx,
)
from fastdiff.export.runners import OnnxRunner, OnnxStepRunner
from fastdiff.export.tensorrt import (
    ShapeOutsideProfileError,
    TensorRTRunner,
    TensorRTUnavailableError,
    build_engine,
    profiles_from_shapes,
)
from fastdiff.export.trt_ops import TENSORRT_SUPPORTED_OPS

__all__ = [
    "DECOMPOSITIONS",
    "DEFAULT_OPSET",
    "TENSORRT_SUPPORTED_OPS",
    "ExportResult",
    "OnnxRunner",
    "OnnxStepRunner",
    "OutputMismatchError",
    "ShapeOutsideProfileError",
    "TensorRTRunner",
    "TensorRTUnavailableError",
    "UnsupportedOpError",
    "build_engine",
    "check_tensorrt_ops",
    "profiles_from_shapes",
    "to_onnx",
    "verify_onnx",
]
