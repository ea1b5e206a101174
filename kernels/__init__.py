"""Fast encode / decode implementations for the CLT (docs/design.md section 4).

    install(clt, impl="auto") -> name      sets clt.encode_impl / clt.decode_impl

impl is one of
    "dense"         the CLT's own reference_encode / reference_decode (train/clt.py: the definitions)
    "torch_sparse"  plain PyTorch: fused JumpReLU encode, sparse CSR decode (the CPU path)
    "triton"        Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1, for tests)

and sets clt.encode_decode_impl to the matching fused encode+decode (kernels/fused.py; None for
"dense"), which CLT.encode_decode (and so CLT.forward) uses.
    "auto"          triton on CUDA when triton imports, torch_sparse otherwise

On CPU, torch_sparse's decode runs its sparse products (CSR x dense forward and weight gradient, the
sampled activation gradient) in small C kernels compiled at first use (kernels/cpu_native.py,
kernels/cpu_sparse.c), with torch's own products as the fallback where no C compiler works or
CLTRAIN_CPU_KERNELS=0.

The individual implementations are exported too: torch_encode, torch_sparse_decode (kernels/torch_ops.py)
and, when triton imports, triton_encode, triton_decode (kernels/triton_ops.py, imported lazily so that
tests can set TRITON_INTERPRET=1 before the kernels are defined). Nothing here knows about ranks: under
feature parallelism each rank decodes its local features.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util

from .fused import torch_encode_decode
from .torch_ops import torch_encode, torch_sparse_decode

IMPLEMENTATIONS = ("dense", "torch_sparse", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


__all__ = ["install", "IMPLEMENTATIONS", "triton_available", "torch_encode", "torch_sparse_decode",
           "torch_encode_decode"]
if triton_available():
    __all__ += ["triton_encode", "triton_decode"]


def _triton_ops():
    return importlib.import_module(f"{__name__}.triton_ops")


def __getattr__(name):  # lazy: triton_encode / triton_decode
    if name in ("triton_encode", "triton_decode"):
        return getattr(_triton_ops(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _device(clt):
    try:
        return next(clt.parameters()).device
    except StopIteration:
        return None


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def retain_freed_cpu_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the OS; True if applied.

    By default glibc serves every block over 32 MiB with a fresh mmap and unmaps it on free, so each
    [B, N, F] temporary of a CPU training step (~200 MB at N=12, F=4096, B=1024) is page-faulted in
    anew: about as costly as the arithmetic on it. Serving large blocks from the heap and never
    trimming it makes later steps reuse memory that is already mapped (benchmarks/kernels.md). The
    cost is that the process keeps its peak heap. A no-op (False) off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt caps the mmap threshold (32 MiB on 64-bit glibc < 2.35, HEAP_MAX/2 later); the
    # largest accepted value is what matters, so try from large to small.
    ok_trim = bool(mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 ** 31 - 1)))
    ok_mmap = any(mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(v)) for v in (2 ** 31 - 1, 2 ** 30, 2 ** 25))
    return ok_trim and ok_mmap


def install(clt, impl: str = "auto") -> str:
    """Set clt.encode_impl and clt.decode_impl to implementation `impl`; return the name chosen."""
    if impl not in ("auto",) + IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {impl!r}; choose one of "
                         f"{('auto',) + IMPLEMENTATIONS}")
    device = _device(clt)
    on_cuda = device is not None and device.type == "cuda"
    if impl == "auto":
        impl = "triton" if on_cuda and triton_available() else "torch_sparse"
    fused = None
    if impl == "dense":
        # the definitions travel with the model (CLT.reference_encode / reference_decode): kernels/
        # imports nothing of train/
        encode, decode = clt.reference_encode, clt.reference_decode
    elif impl == "torch_sparse":
        encode, decode, fused = torch_encode, torch_sparse_decode, torch_encode_decode
    else:
        if not triton_available():
            raise RuntimeError("impl='triton' needs the triton package, which is not importable")
        ops = _triton_ops()
        if not on_cuda and not ops.INTERPRET:
            raise RuntimeError("impl='triton' needs a CUDA model (or TRITON_INTERPRET=1 set before "
                               "cltrain.kernels.triton_ops is imported, for CPU tests)")
        encode, decode = ops.triton_encode, ops.triton_decode
        fused = importlib.import_module(f"{__name__}.fused").triton_encode_decode
    clt.encode_impl = encode
    clt.decode_impl = decode
    clt.encode_decode_impl = fused  # CLT.encode_decode: one Function for encode + decode
    return impl
