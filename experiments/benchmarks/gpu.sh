#!/usr/bin/env bash
# GPU benchmark (bf16): lora-jax LoRA / QLoRA / full fine-tuning next to HF PEFT LoRA, on the
# SmolLM2-135M shape and the Llama-3.2-1B shape, batch 8 x 1024, rank 16 on all seven projections;
# then ours QLoRA on the Llama-3.1-8B shape, batch 1 x 2048, remat (does it fit a 24 GB card?).
# One process per setup (peak device memory is that setup's own); one JSON line each.
#   bash experiments/benchmarks/gpu.sh [OUT_DIR]      (needs jax with CUDA, torch with CUDA, peft)
#   bash experiments/benchmarks/gpu.sh OUT_DIR tiny   (a tiny shape in float32: the same steps, on a CPU)
# Writes OUT_DIR/gpu.jsonl (default experiments/benchmarks/results) and prints a summary.
set -u
cd "$(dirname "$0")/../.."
out=${1:-experiments/benchmarks/results}
mkdir -p "$out"
: > "$out/gpu.jsonl"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
python=${PYTHON:-python3}
if [ "${2:-}" = tiny ]; then
  shapes="tiny"; big="tiny"; small_args="--batch 2 --seq 16 --steps 1 --dtype float32"; big_args="$small_args"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  shapes="smollm2 llama-1b"; big="llama-8b"; small_args=""; big_args="--batch 1 --seq 2048"
fi
for shape in $shapes; do
  for setup in ours_lora ours_qlora peft_lora ours_full; do
    echo "== $shape $setup"
    # shellcheck disable=SC2086
    timeout 120 $python experiments/benchmarks/gpu.py --setup "$setup" --shape "$shape" $small_args \
      2> >(grep -v -i warn | tail -5 >&2) | tee -a "$out/gpu.jsonl" || echo "!! $shape $setup failed or timed out"
  done
done
echo "== $big ours_qlora ($big_args, remat)"
# shellcheck disable=SC2086
timeout 300 $python experiments/benchmarks/gpu.py --setup ours_qlora --shape "$big" $big_args --remat \
  2> >(grep -v -i warn | tail -5 >&2) | tee -a "$out/gpu.jsonl" || echo "!! $big ours_qlora failed or timed out"
$python - "$out/gpu.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
by = {(r["shape"], r["setup"]): r for r in rows}
print("| shape | setup | batch | s/step | s/step pipelined | tokens/s | MFU (bf16 matmul) | peak device MB |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    print(f"| {r['shape']} | {r['setup']} | {r['batch']}x{r['seq']} | {r['step_s']:.4f} | {r['step_s_pipelined']:.4f} "
          f"| {r['tokens_per_s']:.0f} | {r['mfu']:.3f} | {r['peak_device_mb']:.0f} |")
for shape in ("smollm2", "llama-1b", "tiny"):
    g = lambda s: by.get((shape, s), {}).get("step_s")
    if g("ours_lora") and g("peft_lora"):
        print(f"{shape}: ours_lora_over_peft_lora {g('ours_lora') / g('peft_lora'):.3f}")
    if g("ours_lora") and g("ours_qlora"):
        print(f"{shape}: ours_qlora_over_ours_lora {g('ours_qlora') / g('ours_lora'):.3f}")
PY
