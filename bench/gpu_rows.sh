#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one command, on one CUDA GPU, in at most 10 minutes (the steps' limits add up to 9.5):
#   1. the VQ layer (ours vs the peers bench_vq.py knows) in bf16 autocast, and in fp32 where
#      bench_vq.py has a --precision flag;
#   2. training throughput of the tokenizer and MaskGIT at the CelebA-64 presets, bf16 and fp32 (TF32),
#      with MFU against the chip's dense peak;
#   3. sampling images/s at the CelebA-64 presets (256 tokens): MaskGIT T = 8 / 12 against the
#      autoregressive KV-cache baseline of the same size, bf16.
#
#     bash bench/gpu_rows.sh                 # writes runs/bench/gpu/*.json and gpu_rows.md
#     OUT=/tmp/gpu bash bench/gpu_rows.sh
#
# Run from the repository root with the project's environment. Refuses without CUDA. Each step has
# its own time limit, so one slow step cannot eat the others' time; a step that fails or times out
# is reported in gpu_rows.md and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-runs/bench/gpu}

if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: bench/gpu_rows.sh needs a CUDA GPU and torch.cuda.is_available() is False here; the CPU numbers come from the other bench/ scripts (see bench/README.md)" >&2
    exit 2
fi
mkdir -p "$OUT"
REPORT="$OUT/gpu_rows.md"
{
    echo "# GPU rows ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "device: $($PY -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /'
} > "$REPORT"

step() {  # step SECONDS TITLE COMMAND...: run, tee the output into the report, note failures
    local limit=$1 title=$2
    shift 2
    echo; echo "== $title: $*"
    { echo; echo "## $title"; echo; echo "\`$*\`"; echo; } >> "$REPORT"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$(echo "$title" | tr ' /' '__').log" | grep -v -e '^->' -e 'it/s' >> "$REPORT"
    local rc=${PIPESTATUS[0]}
    echo "($((SECONDS - start)) s, exit $rc$([ "$rc" = 124 ] && echo ': timed out'))" >> "$REPORT"
}

step 120 "VQ layer bf16" $PY bench/bench_vq.py --device cuda --quick --out "$OUT/vq_bf16.json"
if $PY bench/bench_vq.py --help 2>/dev/null | grep -q -- "--precision"; then
    step 120 "VQ layer fp32" $PY bench/bench_vq.py --device cuda --quick --precision fp32 --out "$OUT/vq_fp32.json"
else
    echo "(VQ layer fp32 on CUDA: bench_vq.py has no --precision flag in this version; not run)" >> "$REPORT"
fi
step 90 "training bf16" $PY bench/bench_train.py --precision bf16 --out "$OUT/train_bf16.json"
step 90 "training fp32" $PY bench/bench_train.py --precision fp32 --out "$OUT/train_fp32.json"
step 150 "sampling bf16" $PY bench/bench_stage_two.py --configs celeba64:celeba64 --precision bf16 --repeats 5 \
    --out "$OUT/stage_two_bf16.json"
echo; echo "-> $REPORT (and the JSON files next to it)"
