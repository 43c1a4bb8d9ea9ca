"""Triton kernels (installed as fastdiff.kernels). Each module defines its kernels on import, so
import them lazily, from a backend, after TRITON_INTERPRET is settled."""
