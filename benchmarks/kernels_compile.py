"""Compile every Triton kernel variant training launches for sm_80 and sm_90, without a GPU; write
benchmarks/kernels_compile.md with what ptxas reports, and the decode's byte / FLOP counts with
projected H100 times.

    python benchmarks/kernels_compile.py [--out benchmarks/kernels_compile.md]

Compiles at the benchmark shape (N=12, D=768, F=4096, B=4096), the many-layer shape (N=30, D=576,
F=1024, B=1024: SmolLM2-135M, 465 (source, target) pairs) and a paper shape (N=26, D=2304,
F=65,536, B=8192), bf16 (the GPU default) and fp32 (`precision: fp32`, TF32 tensor cores), with the
launch parameters kernels/triton_ops.py uses (kernels/compile_check.py). Exit status 1 when a target
is missed: spills, shared memory above the A100's 163 KB, the encode's matmul off the tensor cores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SHAPES = {"benchmark": (4096, 12, 768, 4096), "many-layer": (1024, 30, 576, 1024), "paper": (8192, 26, 2304, 65536)}
# Projection inputs (H100 SXM, public specifications): HBM3 bandwidth and dense bf16 tensor-core
# throughput as the issue states them; the sparse kernels' FMAs run on CUDA cores in fp32.
HBM_BPS = 3.35e12
TC_FLOPS = 800e12
FMA_FLOPS = 67e12
# Not a published figure: the L2 bandwidth the token-major forward's re-reads are served at. An
# assumption to replace with a measurement (make bench-gpu).
L2_BPS = 5.5e12
L2_BYTES = 50 * 2 ** 20


def compile_all(lines, log) -> int:
    from cltrain.kernels import compile_check as C

    import triton
    lines += [f"Triton {triton.__version__}; ptxas from the Triton wheel. `regs` per thread, `spill` = spill "
              "stores + loads (bytes per thread), `smem` = shared memory per block (KB), `mma` = mma.sync "
              "and `wgmma` = wgmma.mma_async instructions in the PTX (tensor cores).", ""]
    misses = 0
    for shape_name, (B, N, D, F) in SHAPES.items():
        for dtype_name in ("bf16", "fp32"):
            lines += [f"### {shape_name} shape (B={B}, N={N}, D={D}, F={F}), {dtype_name}", "",
                      "| kernel | variant | arch | regs | spill | smem KB | warps | stages | mma | wgmma | "
                      "targets |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for name, variant, kernel, args, kwargs in C.launch_variants(B, N, D, F, dtype_name):
                for arch in C.ARCHS:
                    t0 = time.time()
                    r = C.compile_variant(kernel, args, kwargs, arch, name, variant)
                    bad = C.problems(r)
                    misses += bool(bad)
                    lines.append(f"| {name} | {variant} | sm_{arch} | {r.registers} | {r.spills} | "
                                 f"{r.shared / 1024:.0f} | {r.num_warps} | {r.num_stages} | {r.mma} | {r.wgmma} | "
                                 f"{'; '.join(bad) or 'ok'} |")
                    log(f"{shape_name} {dtype_name} {name} [{variant}] sm_{arch}: {r.registers} regs, "
                        f"{r.spills} B spills, {r.shared} B smem, mma {r.mma}, wgmma {r.wgmma} "
                        f"({time.time() - t0:.1f} s) {bad or ''}")
            lines.append("")
    lines += ["Kernels without a matmul (the encode backward's elementwise pass, the decode kernels) have "
              "no tensor-core instructions by design. The encode backward's two products (dW_enc = "
              "gh^T x, and dx when asked for) are cuBLAS batched matmuls in the model's dtype: bf16 "
              "tensor cores on a GPU. The fp32 variants use TF32 tensor cores for the encode matmul.", ""]
    return misses


def _fmt_bytes(b):
    return f"{b / 1e9:.3g} GB" if b >= 1e8 else f"{b / 1e6:.3g} MB"


def cost_model(lines):
    """Bytes and FLOPs per decode kernel, from the algorithms in kernels/triton_ops.py."""
    from cltrain.kernels import triton_ops as T

    lines += ["## Decode: bytes and FLOPs per step (from the algorithm) and projected H100 times", "",
              "**Projections, not measurements.** Each time is the larger of memory time and compute time: "
              f"HBM at {HBM_BPS / 1e12:.2f} TB/s; dense bf16 tensor-core products at {TC_FLOPS / 1e12:.0f} "
              f"TFLOP/s; the sparse kernels' fp32 FMAs on CUDA cores at {FMA_FLOPS / 1e12:.0f} TFLOP/s "
              f"(H100 SXM). The L2 column is the traffic that hits L2 rather than HBM; at an *assumed* "
              f"{L2_BPS / 1e12:.1f} TB/s of L2 bandwidth (not a published figure: `make bench-gpu` "
              "measures the kernels) it gives the third time. bf16 weights, fp32 y and dY, int64 indices "
              "+ bf16 values in the listings.", "",
              "Kernels (one step, all layers): `fwd` = decode forward (all source layers per launch, token-"
              "major, L2-resident decoder slices, y written once); `fwd, token-major per source` = the "
              "previous design (one launch per source layer, BLOCK_S slots, y read-modify-written per "
              "source); `dW` = decoder-weight gradient (feature-major, each row written once, all layers in "
              "one launch); `act grad` = the sampled activation gradient (all layers in one launch) on 2p of "
              "positions (trained-like window) or on P = active | outside the window (~p + 5%, eps = 2, "
              "fused encode+decode); `window sums` = the fused path's T[s, f] (one launch over all layers "
              "on the Triton path); `dense` = one dense product of the reference (the reference decode "
              "makes three per step). The whole step, phase by phase, at the many-layer shape: "
              "benchmarks/cost_model.md.", "",
              "| shape | p | kernel | FLOPs | HBM bytes | L2 bytes | proj. HBM/compute | proj. with L2 | "
              "x dense |", "|---|---|---|---|---|---|---|---|---|"]
    for shape_name, (B, N, D, F) in SHAPES.items():
        S_sum = N * (N + 1) // 2
        W = F * S_sum * D * 2
        bd = T.decode_block_d(N, F, D, 2)
        resident = N * F * bd * 2 <= L2_BYTES
        dense_flops = 2 * B * F * S_sum * D
        dense_bytes = W + N * B * F * 2 + B * N * D * 4
        t_dense = max(dense_flops / TC_FLOPS, dense_bytes / HBM_BPS)
        for p, mask in ((0.01, 0.02), (0.05, 0.10)):
            nnz = p * B * F  # per layer
            fma = nnz * S_sum * D
            listing = N * nnz * 10
            rows = [
                ("fwd", 2 * fma, (W if resident else fma * 2) + B * N * D * 4 + listing, fma * 2),
                ("fwd, token-major per source", 2 * fma,
                 (W if F * N * 256 * 2 <= L2_BYTES else fma * 2) + B * S_sum * D * 8 + listing, fma * 2),
                ("dW", 2 * fma, W + B * N * D * 4 + listing, fma * 4),
                (f"act grad at {mask:.0%}", 2 * fma * mask / p, W + B * N * D * 4 + N * mask * B * F * 16,
                 fma * mask / p * 6),
                (f"act grad on P ({p + 0.05:.0%}, fused)", 2 * fma * (p + 0.05) / p,
                 W + B * N * D * 4 + N * (p + 0.05) * B * F * 16, fma * (p + 0.05) / p * 6),
                ("window sums (fused)", 2 * F * S_sum * D, W + B * N * D * 4, 0),
                ("dense (one product)", dense_flops, dense_bytes, 0),
            ]
            for name, flops, hbm, l2 in rows:
                rate = TC_FLOPS if name.startswith("dense") else FMA_FLOPS
                t = max(flops / rate, hbm / HBM_BPS)
                t_l2 = max(t, l2 / L2_BPS)
                lines.append(f"| {shape_name} | {p:.0%} | {name} | {flops / 1e9:.3g} G | {_fmt_bytes(hbm)} | "
                             f"{_fmt_bytes(l2) if l2 else '-'} | {t * 1e3:.3g} ms | {t_l2 * 1e3:.3g} ms | "
                             f"{t_dense / t_l2:.2g} |")
        lines.append("")
        note = (f"{shape_name}: decoder {W / 1e9:.3g} GB in bf16; forward D-block {bd}, decoder slices in "
                f"use {N * F * bd * 2 / 2 ** 20:.0f} MiB ({'within' if resident else 'beyond'} a 50 MB L2")
        note += ", so each decoder row is fetched from HBM about once per step)." if resident else (
            ": rows are re-fetched from HBM per use; at this F a GPU holds a feature shard, e.g. F/8 = "
            f"{F // 8} per GPU gives {N * (F // 8) * T.decode_block_d(N, F // 8, D, 2) * 2 / 2 ** 20:.0f} "
            "MiB of slices).")
        lines += [note, ""]
    lines += ["Reading the table: at 1% firing a sparse kernel does 1/100 of the dense product's FLOPs, "
              "but each of its FMAs loads one operand that is not in registers (a decoder element in the "
              "forward, a dY element in dW): 2-4 bytes per FMA from L2. Against bf16 tensor cores that "
              "caps the speed-up near L2 bandwidth / (tensor-core rate x density), about "
              f"{L2_BPS / (TC_FLOPS * 0.01):.1f}x at 1% with the assumed L2 figure, whatever the shape: "
              "the projected decode forward+backward is not 10x the dense reference on an H100 at 1% "
              "firing. The sampled activation gradient reads both operands per FMA (6 bytes): its "
              "projected crossover with the dense product is ~0.2% of positions, so on a GPU the window-"
              "complement path of the fused encode+decode (P ~ 6% at eps = 2) loses to the dense "
              "activation gradient; the Triton path's switches (`triton_ops.DENSE_ACTS_ABOVE` = 0.5%, "
              "`DENSE_GRAD_ABOVE` = 0.3%) follow this projection, so GPU training at ~1% firing uses "
              "dense cuBLAS products until a measurement says otherwise. A design with register-level "
              "reuse of decoder rows (tokens grouped by feature, tensor-core tiles over gathered rows) "
              "is the next step if the measurement agrees. What the new forward removes: the slot "
              "padding to a power of two, and y read-modify-written once per source layer "
              f"({_fmt_bytes(4096 * 78 * 768 * 8)} of HBM traffic at the benchmark shape).", ""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).with_name("kernels_compile.md")))
    args = ap.parse_args(argv)
    from cltrain.kernels import compile_check as C
    C.setup_env()  # before triton is imported
    t0 = time.time()
    lines = ["# Triton kernels compiled for sm_80 and sm_90 (no GPU needed)", "",
             f"Written by `python benchmarks/kernels_compile.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
             "; `make bench-compile`). Targets: zero spills, the encode matmul on tensor cores, shared "
             "memory within the A100's 163 KB per block.", ""]
    try:
        misses = compile_all(lines, lambda m: print(m, flush=True))
    except ImportError as err:
        print(f"the Triton compiler is not available here: {err}", file=sys.stderr)
        return 2
    cost_model(lines)
    lines += [f"Targets missed: {misses} kernel variants. Compile time {time.time() - t0:.0f} s.", ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}; {misses} variants miss a target")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
