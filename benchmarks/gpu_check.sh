#!/usr/bin/env bash
# GPU readiness check, for a machine with an NVIDIA GPU and jax[cuda12|cuda13] already installed (no network, no
# wandb, nothing installed by this script). Runs from the repository root in well under 8 minutes:
#   1. the environment: jax version, devices, whether chest_jax imports without wandb;
#   2. the tests that make sense on a GPU (model, LoRA, data generation, sharding), if pytest is present;
#   3. the train-step / inference benchmark at the full config, float32 and bfloat16, at batch 32 and at a
#      batch that fills the chip (256), with XLA's FLOP count -> achieved TFLOP/s and the data share of the step;
#   4. a short full-config training run, which must reach the stated validation NMSE.
# Everything goes to $OUT (default results/gpu_check): logs, the benchmark JSON files and summary.json.
#     bash benchmarks/gpu_check.sh            # PYTHON=python3 OUT=results/gpu_check by default
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # run from the checkout: nothing to install
export WANDB_MODE=disabled
# Stated target of step 4: the full config after TRAIN_STEPS steps of batch 32 reaches a validation NMSE (mean
# per-sample, mixed distances, dB) at or below this. A generous bar: the CPU preset reaches about -9 dB in 500
# steps; it catches a broken GPU path (NaN, no learning), not a slow one.
TRAIN_STEPS=${TRAIN_STEPS:-3000}
TARGET_VAL_DB=${TARGET_VAL_DB:--10}
# Dense peak of the chip for the achieved-share figures (NVIDIA H100/H200 SXM: 989 TFLOP/s bf16, 67 float32).
PEAK_BF16_TFLOPS=${PEAK_BF16_TFLOPS:-989}
PEAK_F32_TFLOPS=${PEAK_F32_TFLOPS:-67}
status=0
step() { echo; echo "== $*"; }

step "1. environment"
$PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import sys
sys.modules.setdefault("wandb", None)  # prove the package needs no wandb (imports of it raise ImportError)
import jax, flax, optax
import chest_jax.train, chest_jax.compare  # noqa: F401
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)
print("devices:", jax.devices())
print("backend:", jax.default_backend())
EOF
if ! $PY -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  echo "no GPU backend: this script is for a GPU machine"; exit 1
fi

step "2. tests (GPU-relevant subset)"
if $PY -c "import pytest" 2>/dev/null; then
  timeout 90 $PY -m pytest -q -x tests/test_model.py tests/test_lora.py tests/test_ofdm.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt" || status=1
else
  echo "pytest is not installed here: tests skipped" | tee "$OUT/tests.txt"
fi

step "3. benchmarks, full config"
for run in float32:32 float32:256 bfloat16:256; do
  precision=${run%:*}; batch=${run#*:}
  name="bench_${precision}_bs${batch}"
  timeout 90 $PY benchmarks/train_throughput.py --config configs/base.yaml --run-steps 0 --steps 10 --no-pytorch \
    --json "$OUT/$name.json" training.precision=$precision dataset.batch_size=$batch 2>&1 | tail -12 \
    | tee "$OUT/$name.txt" || status=1
done

step "4. short full-config training run ($TRAIN_STEPS steps, target validation NMSE <= $TARGET_VAL_DB dB)"
rm -rf "$OUT/runs"
timeout 150 $PY train_base.py --config configs/base.yaml --no-progress training.output_dir="$OUT/runs" \
  training.saved_model_name=gpu_short training.num_iter=$TRAIN_STEPS training.num_warmup_steps=200 \
  training.lr=5e-4 training.evaluation_step=1000 training.model_save_step=$TRAIN_STEPS training.logging_step=100 \
  2>&1 | tail -8 | tee "$OUT/train.txt" || status=1

$PY - "$OUT" "$TARGET_VAL_DB" "$PEAK_F32_TFLOPS" "$PEAK_BF16_TFLOPS" <<'EOF' || status=1
import json, sys
from pathlib import Path
out, target = Path(sys.argv[1]), float(sys.argv[2])
peak = {"float32": float(sys.argv[3]), "bfloat16": float(sys.argv[4])}
summary = {"benchmarks": {}, "target_val_nmse_db": target}
for path in sorted(out.glob("bench_*.json")):
    r = json.loads(path.read_text())
    summary["benchmarks"][path.stem] = {k: r.get(k) for k in (
        "train_samples_per_s", "end_to_end_samples_per_s", "infer_bs1_ms", "infer_bs32_ms", "data_share_of_step",
        "device_kind")}
    flops = r.get("flops") or {}
    tflops = flops["train_per_sample"] * r["train_samples_per_s"] / 1e12 if flops.get("train_per_sample") else None
    precision = "bfloat16" if "bfloat16" in path.stem else "float32"
    summary["benchmarks"][path.stem].update(train_tflops=tflops,
                                            share_of_peak=None if tflops is None else tflops / peak[precision])
run = out / "runs" / "gpu_short" / "summary.json"
val = json.loads(run.read_text()).get("val_mean_nmse_db") if run.is_file() else None
summary["val_mean_nmse_db"] = val
summary["target_met"] = val is not None and val <= target
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
sys.exit(0 if summary["target_met"] else 1)
EOF
[ $? -eq 0 ] || status=1
echo; echo "gpu_check: $([ $status -eq 0 ] && echo OK || echo 'FAILED (see above)'); results in $OUT"
exit $status
