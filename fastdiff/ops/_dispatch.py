"""Backend dispatch for fused ops (the xformers idea: backends declare what they support as
data, a refused backend says why, and an error lists every backend with its reasons)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

_override = threading.local()


@dataclass(frozen=True)
class Backend:
    """One implementation of an op and what it supports.

    `devices` are device types ("cpu", "cuda"), or a function returning them when that depends on
    the process (e.g. `triton_devices`, read at each call so that TRITON_INTERPRET set after
    fastdiff was imported still counts); `dtypes` the tensor dtypes it accepts. `ready`
    returns a reason when the backend cannot run at all on this machine (extension not built,
    triton missing), else None. `check` gets the op's call arguments and returns extra reasons
    (unsupported head dim, layout, ...); the arguments after the first default to None, and go
    unchecked, so that `why_not(name, x)` asks about x alone. `by_name_only` gets the same
    arguments and returns why automatic dispatch should pass over a call the backend can run
    (Triton's interpreter on CPU tensors, slower than even the reference; a kernel that a later
    backend beats): the backend then runs only when asked for by name or by `use()`."""

    name: str
    fn: Callable
    devices: tuple[str, ...] | Callable[[], tuple[str, ...]]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    ready: Callable[[], str | None] = lambda: None
    check: Callable[..., list[str]] | None = None
    by_name_only: Callable[..., str | None] | None = None


@dataclass
class Op:
    """A fused op: a reference (the definition) plus backends in order of preference."""

    name: str
    reference: Callable
    backends: list[Backend] = field(default_factory=list)

    def __post_init__(self) -> None:
        ref_dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
        self.backends.append(Backend("reference", self.reference, ("cpu", "cuda"), ref_dtypes))

    def register(self, backend: Backend) -> Backend:
        """Add a backend ahead of the reference (which always stays last)."""
        self.backends.insert(len(self.backends) - 1, backend)
        return backend

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def get(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise ValueError(f"{self.name}: unknown backend {name!r}; valid backends: {self.names}")

    def why_not(self, name: str, tensor: torch.Tensor, *args, **kwargs) -> list[str]:
        """Reasons why backend `name` cannot run this call; empty when it can. With the tensor
        alone (`why_not("cuda", x)`), the reasons cover readiness, the tensor's device and dtype
        and what the backend's check can tell from it; pass the call's other arguments to check
        them too."""
        b = self.get(name)
        reasons = [reason] if (reason := b.ready()) else []
        devices = b.devices() if callable(b.devices) else b.devices
        if tensor.device.type not in devices:
            reasons.append(f"device {tensor.device.type} not in {list(devices)}")
        if tensor.dtype not in b.dtypes:
            dts = [str(d).removeprefix("torch.") for d in b.dtypes]
            reasons.append(f"dtype {str(tensor.dtype).removeprefix('torch.')} not in {dts}")
        if not reasons and b.check is not None:
            reasons += b.check(tensor, *args, **kwargs)
        return reasons

    def select(self, tensor: torch.Tensor, *args, backend: str | None = None, **kwargs) -> Backend:
        """The backend for this call: the named one (or the `use()` override), which must accept
        the call, else the first that does."""
        wanted = requested(backend)
        if wanted is not None:
            reasons = self.why_not(wanted, tensor, *args, **kwargs)
            if reasons:
                raise RuntimeError(
                    f"{self.name}: backend {wanted!r} cannot run this call: {'; '.join(reasons)}. "
                    f"Valid backends: {self.names} (pass backend=None to pick automatically)."
                )
            return self.get(wanted)
        refused = []
        for b in self.backends:
            passed_over = b.by_name_only and b.by_name_only(tensor, *args, **kwargs)
            if passed_over:
                refused.append(f"  {b.name}: {passed_over}: only by name")
                continue
            reasons = self.why_not(b.name, tensor, *args, **kwargs)
            if not reasons:
                return b
            refused.append(f"  {b.name}: {'; '.join(reasons)}")
        raise RuntimeError(f"{self.name}: no backend can run this call:\n" + "\n".join(refused))

    def available(self, tensor: torch.Tensor, *args, **kwargs) -> list[str]:
        """Names of the backends that accept this call, in order of preference."""
        return [b.name for b in self.backends if not self.why_not(b.name, tensor, *args, **kwargs)]


def requested(backend: str | None) -> str | None:
    """The backend a call asks for: its own `backend`, else the `use()` override, else None."""
    return backend or getattr(_override, "name", None)


@contextlib.contextmanager
def use(backend: str | None) -> Iterator[None]:
    """Force every fused op inside the block onto `backend` (e.g. "reference"); an op whose
    backend cannot run a call raises with the reasons instead of falling back."""
    previous = getattr(_override, "name", None)
    _override.name = backend
    try:
        yield
    finally:
        _override.name = previous


def triton_ready() -> str | None:
    """None when Triton kernels can run here: a CUDA device, or TRITON_INTERPRET=1 on CPU."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    return None


def triton_devices() -> tuple[str, ...]:
    """Devices Triton kernels run on: CUDA compiled, and CPU tensors under TRITON_INTERPRET=1
    (which must be set before the kernels are defined, i.e. before fastdiff is imported)."""
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def beyond_32_bit_offsets(*tensors: torch.Tensor | None) -> list[str]:
    """Why a Triton kernel whose offsets are 32-bit products (of program ids and strides that
    fit in 32 bits) cannot take these tensors: one of 2^31 elements or more."""
    big = max((t.numel() for t in tensors if t is not None), default=0)
    if big < 2**31:
        return []
    return [f"a tensor of {big} elements (2^31 or more; the Triton kernel's offsets are 32-bit)"]


def triton_backend(
    fn: Callable,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16),
    check: Callable[..., list[str]] | None = None,
    by_name_only: Callable[..., str | None] | None = None,
) -> Backend:
    """The `triton` backend of an op: compiled on CUDA; on CPU tensors (TRITON_INTERPRET=1), and
    where the op's own `by_name_only` says so, only when asked for by name."""

    def passed_over(tensor: torch.Tensor, *args, **kwargs) -> str | None:
        if tensor.device.type == "cpu":
            return "interpreted on cpu"
        return by_name_only(tensor, *args, **kwargs) if by_name_only else None

    return Backend("triton", fn, triton_devices, dtypes, triton_ready, check, passed_over)


def extension_ready(op: str, device_types: Sequence[str] = ("cpu",)) -> Callable[[], str | None]:
    """A `ready` check for ops implemented in fastdiff._C. The answer is computed once (a failed
    import of the extension is not retried on every call)."""
    answer: list[str | None] = []

    def ready() -> str | None:
        if not answer:
            from fastdiff import _ext
            from fastdiff.ops import _library

            if not _ext.available():
                reason = (
                    "the compiled extension fastdiff._C is not built "
                    "(pip install -e . --no-build-isolation)"
                )
            elif not _library.has_op(op):
                reason = f"fastdiff._C was built without the {op} op"
            elif "cpu" not in device_types and not _ext.build_info()["cuda"]:
                reason = "fastdiff._C was built without CUDA"
            else:
                reason = None
            answer.append(reason)
        return answer[0]

    return ready


def extension_backend(
    device: str,
    op: str,
    fn: Callable,
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16),
    check: Callable[..., list[str]] | None = None,
) -> Backend:
    """The `device` backend ("cuda" or "cpu", named after its device) of an op that fastdiff._C
    implements as torch.ops.fastdiff.<op>: ready once the extension is built with that op (and,
    for cuda, with CUDA)."""
    return Backend(device, fn, (device,), dtypes, ready=extension_ready(op, (device,)), check=check)
