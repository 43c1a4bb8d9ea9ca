"""Fused ops: each has a PyTorch reference (its definition) and faster backends."""

from fastdiff.ops._dispatch import Backend, Op, use

__all__ = ["Backend", "Op", "use"]
