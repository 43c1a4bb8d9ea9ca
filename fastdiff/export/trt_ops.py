"""ONNX operator types the TensorRT ONNX parser accepts, kept here so an exported graph can be
checked without TensorRT installed.

Source: onnx-tensorrt, docs/operators.md ("Supported ONNX Operators", TensorRT 10.x parser,
https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md), restricted to the operators
listed there as supported. Operators the parser lists as unsupported (e.g. Bernoulli, BitShift,
ConvInteger, Det, DynamicQuantizeLinear, MatMulInteger, Multinomial, STFT, StringNormalizer,
TfIdfVectorizer, Unique) are absent. Some supported ops carry restrictions (dtype, constant
inputs) that only the parser itself checks; this list is a necessary condition, not sufficient.
"""

from __future__ import annotations

TENSORRT_SUPPORTED_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Compress Concat
    ConcatFromSequence Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
    Floor GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
    GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HammingWindow HannWindow
    HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN
    LSTM MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
    ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan
    Scatter ScatterElements ScatterND Selu SequenceAt SequenceConstruct SequenceEmpty
    SequenceErase SequenceInsert SequenceLength Shape Shrink Sigmoid Sign Sin Sinh Size Slice
    Softmax Softplus Softsign SpaceToDepth Split SplitToSequence Sqrt Squeeze Sub Sum Tan Tanh
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
