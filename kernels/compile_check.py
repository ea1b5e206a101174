"""Compile the Triton kernels for a GPU that is not here, and report what the GPU would get.

Triton's real compiler (with the ptxas its wheel ships) runs without a GPU: `compile_variant` binds a
kernel's arguments exactly as a launch would (the kernel's own binder, so integer specializations,
64-bit promotion of large integers and pointer alignment match), compiles for sm_80 or sm_90, and
reads registers and spills from ptxas -v, shared memory and warps from the compiled metadata, and
tensor-core instructions from the PTX. Used by benchmarks/kernels_compile.py and the tests.

Must run in a process where TRITON_INTERPRET is unset (interpreted kernels do not compile), and
TRITON_ALWAYS_COMPILE=1 / TRITON_DUMP_PTXAS_LOG=1 must be set before triton is imported (`setup_env`).

Private Triton API used (checked with Triton 3.6 and 3.9): `create_function_from_signature` and
`JITFunction._pack_args` (how `JITFunction.run` turns arguments into a signature, constexprs and
attributes), and the ptxas -v log Triton prints under TRITON_DUMP_PTXAS_LOG.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass

ARCHS = (80, 90)
# The A100's largest shared memory per block (163 KB); the H100 allows 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def setup_env():
    """Environment the compile check needs; call before triton is first imported."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile check needs TRITON_INTERPRET unset (interpreted kernels do not compile)")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel would print no ptxas log
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


class Ptr:
    """A stand-in for a tensor argument: all the binder reads is .dtype and .data_ptr()."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self):
        return 1 << 20  # 16-byte aligned, like every allocation a launch passes


@dataclass
class Report:
    kernel: str
    variant: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    num_warps: int
    num_stages: int
    mma: int  # mma.sync (sm_80 tensor cores; also emitted on sm_90 where wgmma does not apply)
    wgmma: int  # wgmma.mma_async (sm_90 warp-group tensor cores)
    ptx: str = ""

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(kernel, args, kwargs, arch: int, name: str = "", variant: str = "") -> Report:
    """Compile `kernel[grid](*args, **kwargs)` for sm_<arch> without launching it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    text = log.getvalue()
    regs, spill = _REGS.search(text), _SPILL.search(text)
    if regs is None or spill is None:
        raise RuntimeError(f"no ptxas -v log for {name} on sm_{arch} (TRITON_DUMP_PTXAS_LOG unset before "
                           f"triton was imported?):\n{text[-2000:]}")
    ptx = compiled.asm["ptx"]
    md = compiled.metadata
    return Report(kernel=name or kernel.__name__, variant=variant, arch=arch, registers=int(regs.group(1)),
                  spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)), shared=int(md.shared),
                  num_warps=int(md.num_warps), num_stages=int(md.num_stages),
                  mma=len(re.findall(r"^\s*mma\.sync", ptx, re.M)),
                  wgmma=len(re.findall(r"^\s*wgmma\.mma_async", ptx, re.M)), ptx=ptx)


def launch_variants(B: int, N: int, D: int, F: int, dtype_name: str = "bf16", hot_only: bool = False):
    """(kernel name, variant, kernel, args, kwargs) for every kernel variant training launches at this
    shape, with the arguments the wrappers in kernels/triton_ops.py pass (kept in step with them)."""
    import torch

    from . import triton_ops as T

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    f32, i8, i32, i64 = torch.float32, torch.int8, torch.int32, torch.int64
    eb = T.ENCODE_BLOCKS
    out = []
    # encode forward: x [B, N, D] (a contiguous batch), W_enc [N, F, D]
    out.append(("encode_fwd", dtype_name, T._encode_fwd_kernel,
                [Ptr(dt), Ptr(dt), Ptr(dt), Ptr(dt), Ptr(dt), Ptr(dt), Ptr(i8), Ptr(f32), B, F, D, 1.0,
                 N * D, D, 1, F * D, D, 1, B * F],
                dict(BLOCK_B=eb["block_b"], BLOCK_F=eb["block_f"], BLOCK_D=eb["block_d"],
                     DOT_F32=dt != torch.bfloat16, IEEE=False, **T.ENCODE_LAUNCH)))
    # encode backward: what training asks for (acts + preact_gap), with and without straight-through
    # to h, with the fused encode+decode's window sums, and all three gradients (AuxK reads pre)
    bwd = [("acts+gap", dict(HAS_GPRE=False, HAS_GACTS=True, HAS_GGAP=True, HAS_WEXT=False, ST_TO_PREACT=False)),
           ("acts+gap, window sums", dict(HAS_GPRE=False, HAS_GACTS=True, HAS_GGAP=True, HAS_WEXT=True,
                                          ST_TO_PREACT=False)),
           ("acts+gap, st to h", dict(HAS_GPRE=False, HAS_GACTS=True, HAS_GGAP=True, HAS_WEXT=False,
                                      ST_TO_PREACT=True)),
           ("pre+acts+gap, st to h", dict(HAS_GPRE=True, HAS_GACTS=True, HAS_GGAP=True, HAS_WEXT=False,
                                          ST_TO_PREACT=True))]
    for label, flags in bwd[:1] if hot_only else bwd:
        out.append(("encode_bwd", f"{dtype_name}, {label}", T._encode_bwd_kernel,
                    [Ptr(dt), Ptr(dt), Ptr(dt), Ptr(dt), Ptr(dt), Ptr(f32), Ptr(dt), Ptr(f32),
                     B, F, 0.5, 1.0, B * F],
                    dict(**flags, BLOCK_B=T.ENCODE_BWD_BLOCK_B, BLOCK_F=eb["block_f"], **T.ENCODE_BWD_LAUNCH)))
    # decode: W_dec[s] [F, N - s, D] (pointer tables), y [B, N, D] fp32 (the forward's output), dY
    # [B, N, D] in the model's dtype (y is returned in it); each product one launch over all layers
    bd = T.decode_block_d(N, F, D, 2 if dtype_name == "bf16" else 4)
    out.append(("decode_fwd", f"{dtype_name}, BLOCK_D={bd}", T._decode_fwd_kernel,
                [Ptr(f32), Ptr(dt), Ptr(i64), Ptr(i64), Ptr(i64), Ptr(i64), Ptr(dt), B, D, N * D, D],
                dict(PER_LAYER=False, BLOCK_D=bd, **T._decode_launch(bd))))
    out.append(("decode_dw", f"{dtype_name}, BLOCK_D={bd}", T._decode_dw_kernel,
                [Ptr(dt), Ptr(i64), Ptr(i64), Ptr(i32), Ptr(dt), Ptr(i64), Ptr(i64), Ptr(dt), F, D, N * D, D],
                dict(BLOCK_D=bd, **T._decode_launch(bd))))
    out.append(("decode_sampled_grad", f"{dtype_name}, BLOCK_D={bd}", T._decode_sampled_grad_kernel,
                [Ptr(f32), Ptr(dt), Ptr(dt), Ptr(i64), Ptr(i64), Ptr(i64), Ptr(i64), Ptr(i64), Ptr(i64), B, F,
                 N * D, D],
                dict(BLOCK_D=bd, **T._decode_launch(bd))))
    wb = T.WINDOW_BLOCKS
    out.append(("window_totals", f"{dtype_name}, {wb['block_f']}x{wb['block_k']}", T._window_totals_kernel,
                [Ptr(f32), Ptr(f32), Ptr(dt), Ptr(i64), Ptr(i64), Ptr(i64), F, D],
                dict(BLOCK_F=wb["block_f"], BLOCK_K=wb["block_k"], **T.WINDOW_LAUNCH)))
    return out


def problems(r: Report) -> list[str]:
    """What misses the targets: spills, shared memory over the arch's limit, a bf16 matmul off the
    tensor cores (the encode forward is the only kernel with a matmul)."""
    out = []
    if r.spills:
        out.append(f"{r.spills} bytes of spills")
    if r.shared > SMEM_LIMIT[r.arch]:
        out.append(f"shared memory {r.shared} > {SMEM_LIMIT[r.arch]}")
    if r.kernel == "encode_fwd" and (r.wgmma if r.arch >= 90 else r.mma) == 0:
        out.append("encode matmul not on tensor cores")
    return out
