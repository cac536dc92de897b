#!/usr/bin/env bash
# The GPU check of issue 10, run once on a lent GPU machine (torch 2.11, transformers 5.17, no gguf, no network):
#   1. the CUDA test subset (tests/test_cuda.py, marker `cuda`), 2. recipes/bench_gpu.py (random-init GPT-2-XL and
#   Llama-7B size models in bf16; about 5-6 minutes on an H100/H200, bounded by --budget-s).
# Everything is printed and also written under $OUT (pytest log, bench log, bench_gpu.json).
#
# Needs the SmolLM2 tokenizer files carried with the repository (no network there). Before the run, here:
#   mkdir -p shared/smollm2-tokenizer && cp ~/.cache/locedit/smollm2-135m/{tokenizer.json,tokenizer_config.json} \
#       shared/smollm2-tokenizer/          # ~3.4 MB; or carry any directory and pass it as TOKENIZER_DIR
# Run (repository root, nothing installed):  bash recipes/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export OUT
TOKENIZER_DIR="${TOKENIZER_DIR:-shared/smollm2-tokenizer}"
BUDGET="${BENCH_BUDGET_S:-330}"
BENCH_ARGS="${BENCH_ARGS:-}"   # e.g. "--quick --device cpu" to try this script on a CPU

{
  echo "== environment"
  python - <<'PY'
import torch, transformers, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>/dev/null || true
} 2>&1 | tee "$OUT/environment.txt"

echo "== 1. CUDA test subset"
start=$(date +%s)
timeout 240 python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -rA 2>&1 | tail -n 60 | tee "$OUT/test_cuda.txt"
test_rc=${PIPESTATUS[0]}
echo "tests: exit $test_rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/test_cuda.txt"

echo "== 2. GPU benchmark"
if [ -f "$TOKENIZER_DIR/tokenizer.json" ]; then
  timeout $(( ${BUDGET%.*} + 120 )) python recipes/bench_gpu.py --tokenizer "$TOKENIZER_DIR" --budget-s "$BUDGET" $BENCH_ARGS \
      2>&1 | grep -v '^Loading weights' | tee "$OUT/bench_gpu.txt"
  bench_rc=${PIPESTATUS[0]}
else
  echo "no $TOKENIZER_DIR/tokenizer.json: set TOKENIZER_DIR (see the header of this script)" | tee "$OUT/bench_gpu.txt"
  bench_rc=2
fi
echo "== done: tests exit $test_rc, bench exit $bench_rc; results in $OUT"
exit $(( test_rc != 0 || bench_rc != 0 ))
