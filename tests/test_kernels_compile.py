"""The hot Triton kernels compiled for sm_80 and sm_90 by Triton's real compiler (no GPU needed):
no spills, the encode matmul on tensor cores in bf16, shared memory within the A100's limit.

Runs in a subprocess: compiling needs TRITON_INTERPRET unset and Triton's compile knobs set before it
is imported, while the other kernel tests run the interpreter in this process.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import json, sys
from cltrain.kernels import compile_check as C
C.setup_env()
try:
    import triton.backends.nvidia.compiler  # noqa: F401  (the CUDA backend and its ptxas)
except Exception as err:
    print(json.dumps({"unavailable": f"{type(err).__name__}: {err}"}))
    sys.exit(0)
out = []
# the benchmark shape and the many-layer one (N=30: the one-launch decode backward over 465 pairs)
for B, N, D, F in ((4096, 12, 768, 4096), (1024, 30, 576, 1024)):
    for name, variant, kernel, args, kwargs in C.launch_variants(B, N, D, F, "bf16", hot_only=True):
        for arch in C.ARCHS:
            r = C.compile_variant(kernel, args, kwargs, arch, name, variant)
            out.append(dict(kernel=name, variant=f"{variant}, N={N}", arch=arch, regs=r.registers,
                            spills=r.spills, shared=r.shared, mma=r.mma, wgmma=r.wgmma, problems=C.problems(r)))
print(json.dumps(out))
'''


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")
def test_hot_kernels_compile_clean_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if isinstance(result, dict):
        pytest.skip(f"the Triton CUDA compiler is unavailable here: {result['unavailable']}")
    kernels = {r["kernel"] for r in result}
    assert kernels == {"encode_fwd", "encode_bwd", "decode_fwd", "decode_dw", "decode_sampled_grad",
                       "window_totals"}, kernels
    assert {r["arch"] for r in result} == {80, 90}
    bad = [r for r in result if r["problems"]]
    assert not bad, "\n".join(f"{r['kernel']} [{r['variant']}] sm_{r['arch']}: {r['problems']}" for r in bad)
    enc = {r["arch"]: r for r in result if r["kernel"] == "encode_fwd"}
    assert enc[80]["mma"] > 0 and enc[90]["wgmma"] > 0, enc  # bf16 tensor cores on both architectures
