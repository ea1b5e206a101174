"""Compiled CPU kernels (kernels/cpu_sparse.c), built at first use with the machine's C compiler.

    sampled_product(W, Y, ccol, rows, out) -> bool    out[p] = <W[f], Y[rows[p]]>, pairs by feature
    csr_dense(ptr, idx, vals, D, out, accumulate) -> bool
                                                      out[r] (+)= sum_p vals[p] D[idx[p]], by row
    decode_grads(W, Y, ccol, rows, act, coef, out, dW) -> bool
                                                      both: out[p] = <W[f], Y[rows[p]]> and
                                                      dW[f] = coef[f] W[f] + sum_p act[p] Y[rows[p]]

Why compiled: the sparse products of a CPU training step (the decode's forward, weight gradient and
activation gradient on a mask; the encoder's weight gradient) load one dense element per multiply-add,
and torch's CPU kernels for them (sampled_addmm; MKL's CSR x dense addmm) run at ~10 GFLOP/s; the C
kernels keep the dense operand's column block in cache and the rest in registers (benchmarks/
kernels.md, "Sparse products"). They are plain C with GCC/Clang vector extensions and pthreads: no
Python build step and no new dependency; compiled in a second or two with -march=native for the CPU
they run on, and cached per source, compiler and CPU (a home directory shared by a cluster's
different CPUs gets one build each).

Where no C compiler works, or CLTRAIN_CPU_KERNELS=0, both functions return False and the caller uses
torch's own products: the same values up to fp32 rounding. The first failure is reported once, with
the compiler's message, as a warning.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_sparse.c")
# -ffp-contract=fast: fused multiply-adds (ISO C modes turn contraction off)
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-pthread", "-std=gnu11",
         "-Wno-psabi"]
# Columns per cache block of the sampled product: a block of Y (B x BLOCK floats, 4 MB at B = 1024)
# stays in cache while every feature's tokens re-read it. 512 to 2048 measured within 20% of each
# other on the 2-core AMD EPYC VM (2026-12-06); smaller blocks lose more to per-block overhead.
BLOCK = 1024

_lock = threading.Lock()
_lib = None  # the loaded library; False once loading failed
_failure: str | None = None


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def cache_dir() -> Path:
    base = os.environ.get("CLTRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cltrain")
    return Path(base) / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(cc: str | None = None) -> Path:
    """Compile kernels/cpu_sparse.c for this CPU (or reuse the cached build); the library's path.
    Raises RuntimeError naming the compiler and its message when it fails."""
    cc = cc or _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"C compiler {cc} does not run: {exc}") from exc
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), version.encode(),
                                     _cpu_key().encode()])).hexdigest()[:16]
    out = cache_dir() / f"cpu_sparse-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build under a temporary name, then rename: concurrent ranks never load a half-written file
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to compile {SOURCE} (exit {proc.returncode}):\n"
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        os.replace(tmp, out)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{cc} did not finish compiling {SOURCE} in 300 s") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load():
    global _lib, _failure
    if _lib is not None:  # loaded, or failed once: no lock on the hot path
        return _lib or None
    with _lock:
        if _lib is None:
            try:
                lib = ctypes.CDLL(str(build()))
                i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
                lib.cltrain_sampled_f32.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, ptr, ptr, i64, i32]
                lib.cltrain_csr_dense_f32.argtypes = [ptr, ptr, ptr, i64, ptr, i64, i64, ptr, i64, i32, i32]
                lib.cltrain_decode_grads_f32.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64, ptr, ptr, ptr,
                                                         ptr, ptr, i32]
                lib.cltrain_sampled_f32.restype = lib.cltrain_csr_dense_f32.restype = i32
                lib.cltrain_decode_grads_f32.restype = i32
                _lib = lib
            except (RuntimeError, OSError, AttributeError) as exc:
                _lib, _failure = False, str(exc)
                warnings.warn(f"cltrain: the compiled CPU sparse products are unavailable, using "
                              f"torch's (sampled_addmm, CSR addmm; slower) instead: {exc}", RuntimeWarning,
                              stacklevel=3)
    return _lib or None


def enabled() -> bool:
    return os.environ.get("CLTRAIN_CPU_KERNELS", "1") not in ("0", "false", "no", "off")


def available() -> bool:
    """True when the compiled kernel is enabled and loads (building it if needed)."""
    return enabled() and _load() is not None


def failure() -> str | None:
    """Why the compiled kernel did not load (None if it did or was not tried)."""
    return _failure


def _check(fn, name, t, dtype, dims):
    if t.device.type != "cpu" or t.dtype != dtype or t.dim() != dims:
        raise ValueError(f"{fn}: {name} must be a {dims}-d CPU {dtype} tensor, got "
                         f"{t.dim()}-d {t.device.type} {t.dtype}")


def _check_sparse(fn, ptr, idx, n_rows: int, n_cols: int, what: str):
    """ptr [n_rows + 1] from 0, non-decreasing; idx [ptr[-1]] in [0, n_cols): the C code trusts both."""
    _check(fn, "pointers", ptr, torch.int64, 1)
    _check(fn, "indices", idx, torch.int64, 1)
    if not (ptr.is_contiguous() and idx.is_contiguous()):
        raise ValueError(f"{fn}: pointers and indices must be contiguous")
    if ptr.numel() != n_rows + 1:
        raise ValueError(f"{fn}: pointers have {ptr.numel()} entries, expected {n_rows + 1}")
    n = int(ptr[-1])
    if int(ptr[0]) != 0 or idx.numel() != n:
        raise ValueError(f"{fn}: pointers span {int(ptr[0])}..{n}, indices have {idx.numel()} entries")
    if n_rows and bool((ptr[1:] < ptr[:-1]).any()):
        raise ValueError(f"{fn}: pointers must be non-decreasing")
    if n:
        lo, hi = torch.aminmax(idx)  # one pass: this runs per layer on the training hot path
        if int(lo) < 0 or int(hi) >= n_cols:
            raise ValueError(f"{fn}: {what} index out of range [0, {n_cols})")
    return n


def _matrices(fn, **named):
    """Two float32 CPU matrices with the same number of columns, each with unit column stride."""
    (name_a, a), (name_b, b) = named.items()
    for name, t in named.items():
        _check(fn, name, t, torch.float32, 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{fn}: {name_a} has {a.shape[1]} columns, {name_b} {b.shape[1]}")
    for name, t in named.items():
        if t.stride(1) != 1 and t.shape[1] > 1:
            raise ValueError(f"{fn}: {name} needs unit column stride, got strides {tuple(t.stride())}")


def _vector(fn, name, t, n: int):
    _check(fn, name, t, torch.float32, 1)
    if not t.is_contiguous() or t.numel() != n:
        raise ValueError(f"{fn}: {name} must be contiguous with {n} entries, got {t.numel()}")


def sampled_product(W, Y, ccol, rows, out) -> bool:
    """out[p] = <W[f], Y[rows[p]]> for p in [ccol[f], ccol[f + 1]), every feature f; True when done,
    False when the compiled kernels are unavailable (nothing written).

    W [F, K] and Y [B, K] float32 with unit column stride (any row stride), ccol [F + 1] and rows
    int64 contiguous, out float32 contiguous with ccol[F] elements."""
    if not available():
        return False
    fn = "sampled_product"
    _matrices(fn, W=W, Y=Y)
    F, K = W.shape
    _vector(fn, "out", out, _check_sparse(fn, ccol, rows, F, Y.shape[0], "token"))
    _lib.cltrain_sampled_f32(W.data_ptr(), W.stride(0), Y.data_ptr(), Y.stride(0), F, K, ccol.data_ptr(),
                             rows.data_ptr(), out.data_ptr(), BLOCK, torch.get_num_threads())
    return True  # the C code returns -1 only when threads could not start: the work then ran here


def csr_dense(ptr, idx, vals, D, out, accumulate: bool) -> bool:
    """out[r] = (out[r] if accumulate else 0) + sum_p vals[p] * D[idx[p]] for p in [ptr[r], ptr[r + 1]),
    every row r of out; True when done, False when the compiled kernels are unavailable (nothing
    written). The CSR matrix (ptr [R + 1], idx, vals) times D [M, K] into out [R, K]; D and out
    float32 with unit column stride (any row stride), ptr and idx int64, vals float32, contiguous."""
    if not available():
        return False
    fn = "csr_dense"
    _matrices(fn, D=D, out=out)
    R, K = out.shape
    _vector(fn, "vals", vals, _check_sparse(fn, ptr, idx, R, D.shape[0], "column"))
    _lib.cltrain_csr_dense_f32(ptr.data_ptr(), idx.data_ptr(), vals.data_ptr(), R, D.data_ptr(), D.stride(0),
                               K, out.data_ptr(), out.stride(0), int(accumulate), torch.get_num_threads())
    return True


def decode_grads(W, Y, ccol, rows, act, coef, out, dW) -> bool:
    """A source layer's decode backward in one pass over its decoder rows: for every feature f and its
    mask pairs p in [ccol[f], ccol[f + 1]) (token rows[p], activation act[p], 0 where inactive)
        out[p] = <W[f], Y[rows[p]]>        dW[f] = coef[f] W[f] + sum_p act[p] Y[rows[p]]
    (coef None: 0). True when done, False when the compiled kernels are unavailable (nothing written).
    W, dW [F, K] and Y [B, K] float32 with unit column stride (any row stride); ccol [F + 1], rows
    int64 and act, coef [F], out float32, contiguous."""
    if not available():
        return False
    fn = "decode_grads"
    _matrices(fn, W=W, Y=Y)
    _matrices(fn, W=W, dW=dW)
    F, K = W.shape
    if dW.shape[0] != F:
        raise ValueError(f"{fn}: dW has {dW.shape[0]} rows, W {F}")
    n = _check_sparse(fn, ccol, rows, F, Y.shape[0], "token")
    _vector(fn, "act", act, n)
    _vector(fn, "out", out, n)
    if coef is not None:
        _vector(fn, "coef", coef, F)
    _lib.cltrain_decode_grads_f32(W.data_ptr(), W.stride(0), Y.data_ptr(), Y.stride(0), dW.data_ptr(), dW.stride(0),
                                  F, K, ccol.data_ptr(), rows.data_ptr(), act.data_ptr(),
                                  None if coef is None else coef.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return True
