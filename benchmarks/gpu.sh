#!/usr/bin/env bash
# make bench-gpu: everything the first machine with a GPU should run, in one call, from a clean clone.
#
#   1. the kernel tests on the device (Triton natively, bf16 and fp32, against their PyTorch twins)
#   2. the timing benchmark (benchmarks/kernels.py on CUDA: bf16, the GPU shape B=4096) with the
#      targets: decode >= 10x dense at 1% active, fused encode >= 70% of a plain bf16 matmul's
#      TFLOP/s, a training step within 2x of its floor; and the many-layer shape (N=30, D=576, F=1024,
#      B=1024, SmolLM2-135M) with its phase split and floor (shape_report)
#   3. a short real training run (clt-train on a synthetic dataset, device=cuda precision=bf16), and the
#      live-activation test on the device (tests/test_live.py -k gpu)
# and writes benchmarks/gpu/ (logs) and benchmarks/kernels_gpu.md, each naming the device.
#
# Needs no installation: it runs the system python (PYTHON=...) with the repository on PYTHONPATH
# through a temporary cltrain/ package of links (the layout setup.py maps). Packages that the
# training run needs and a GPU machine may lack (hydra-core, omegaconf, webdataset, wandb, gguf,
# deepspeed) are installed from wheels in ./.wheels when that folder exists (fill it where there
# is network: `python3 -m pip download -d .wheels hydra-core omegaconf webdataset`, and carry it);
# otherwise step 3 is skipped with a message naming what is missing. Exit status: non-zero when a
# step failed or there is no CUDA device.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=benchmarks/gpu

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "make bench-gpu: no CUDA device here ($PY: torch.cuda.is_available() is false or torch is" \
         "missing). Run it on a machine with a GPU." >&2
    exit 1
fi
mkdir -p "$OUT"
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/cltrain"
cp cltrain/*.py "$SHIM/cltrain/"  # the leaf modules (errors, files, rank_env, names, encoding)
for pkg in train kernels configs; do ln -s "$PWD/$pkg" "$SHIM/cltrain/$pkg"; done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .wheels ]; then
    "$PY" -m pip install -q --no-index --find-links .wheels --target "$SHIM/deps" \
        hydra-core omegaconf webdataset >"$OUT/wheels.log" 2>&1 || echo "installing from .wheels failed: $OUT/wheels.log"
    export PYTHONPATH="$PYTHONPATH:$SHIM/deps"
fi
DEVICE=$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')
echo "device: $DEVICE" | tee "$OUT/device.txt"
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$OUT/device.txt"
nvidia-smi >>"$OUT/device.txt" 2>&1 || true
status=0

echo "== 1. kernel tests on $DEVICE"
# --noconftest: tests/conftest.py builds datasets through train/config.py, which needs omegaconf
"$PY" -m pytest -q -p no:cacheprovider --noconftest tests/test_kernels.py tests/test_kernels_fused.py \
    tests/test_kernels_compile.py 2>&1 | tee "$OUT/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2. kernel timings on $DEVICE"
"$PY" benchmarks/kernels.py --out benchmarks/kernels_gpu.md 2>&1 | tee "$OUT/kernels.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 3. a short training run on $DEVICE (synthetic data, precision=bf16)"
missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("hydra", "omegaconf", "webdataset", "deepspeed") if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "skipped: the training run needs $missing, not importable here (no network on the GPU machine:" \
         "fill .wheels with their wheels and carry it, see benchmarks/gpu.sh)" | tee "$OUT/train.txt"
else
    DATA=$(mktemp -d)
    "$PY" -c "from cltrain.train.data import write_synthetic_dataset as w; w('$DATA/ds', n_layers=12, d_model=768, n_tokens=65536, tokens_per_sample=64, shard_tokens=16384)" \
        && "$PY" -m cltrain.train.trainer data.path="$DATA/ds" out_dir="$DATA/run" device=cuda precision=bf16 \
            steps=40 batch_tokens=4096 checkpoint_every=1000 log_every=10 logger=none progress=false \
            model.threshold_calibration_rate=0.01 kernels=auto 2>&1 | tee "$OUT/train.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    rm -rf "$DATA"
    echo "== 3b. live activations on $DEVICE (the base model on the training device; resumed run exact)"
    "$PY" -m pytest -q -p no:cacheprovider tests/test_live.py -k gpu 2>&1 | tee "$OUT/live.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

{
    echo "# GPU benchmark run"
    echo
    echo "Written by \`make bench-gpu\` ($(date -u '+%Y-%m-%d %H:%M UTC')) on: $DEVICE"
    echo
    echo "- kernel tests: $(tail -n 1 "$OUT/tests.txt")"
    echo "- kernel timings: benchmarks/kernels_gpu.md (log: $OUT/kernels.txt)"
    echo "- the floor to compare them with, per phase (arithmetic): benchmarks/cost_model.md (python benchmarks/cost_model.py)"
    echo "- training run: $(grep -E 'skipped|step|error|Error' "$OUT/train.txt" | tail -n 1)"
    echo "- exit status: $status"
} >"$OUT/README.md"
cat "$OUT/README.md"
exit $status
