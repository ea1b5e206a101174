"""Fast encode / decode implementations for the CLT (DESIGN section 4).

    install(clt, impl="auto") -> name      sets clt.encode_impl / clt.decode_impl

impl is one of
    "dense"         train/clt.py's reference_encode / reference_decode (the definitions)
    "torch_sparse"  plain PyTorch: fused JumpReLU encode, sparse CSR decode (the CPU path)
    "triton"        Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1, for tests)
    "auto"          triton on CUDA when triton imports, torch_sparse otherwise

The individual implementations are exported too: torch_encode, torch_sparse_decode (kernels/torch_ops.py)
and, when triton imports, triton_encode, triton_decode (kernels/triton_ops.py, imported lazily so that
tests can set TRITON_INTERPRET=1 before the kernels are defined). Nothing here knows about ranks: under
feature parallelism each rank decodes its local features.
"""
from __future__ import annotations

import importlib
import importlib.util

from cltrain.train.clt import reference_decode, reference_encode

from .torch_ops import torch_encode, torch_sparse_decode

IMPLEMENTATIONS = ("dense", "torch_sparse", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


__all__ = ["install", "IMPLEMENTATIONS", "triton_available", "torch_encode", "torch_sparse_decode",
           "reference_encode", "reference_decode"]
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


def install(clt, impl: str = "auto") -> str:
    """Set clt.encode_impl and clt.decode_impl to implementation `impl`; return the name chosen."""
    if impl not in ("auto",) + IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {impl!r}; choose one of "
                         f"{('auto',) + IMPLEMENTATIONS}")
    device = _device(clt)
    on_cuda = device is not None and device.type == "cuda"
    if impl == "auto":
        impl = "triton" if on_cuda and triton_available() else "torch_sparse"
    if impl == "dense":
        encode, decode = reference_encode, reference_decode
    elif impl == "torch_sparse":
        encode, decode = torch_encode, torch_sparse_decode
    else:
        if not triton_available():
            raise RuntimeError("impl='triton' needs the triton package, which is not importable")
        ops = _triton_ops()
        if not on_cuda and not ops.INTERPRET:
            raise RuntimeError("impl='triton' needs a CUDA model (or TRITON_INTERPRET=1 set before "
                               "cltrain.kernels.triton_ops is imported, for CPU tests)")
        encode, decode = ops.triton_encode, ops.triton_decode
    clt.encode_impl = encode
    clt.decode_impl = decode
    return impl
