#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one command, on one CUDA GPU, in at most 14.5 minutes (the steps' limits):
#   sync       the test that a training step of either stage never waits on the host
#              (torch.cuda.set_sync_debug_mode("error")), and the CPU count of host reads beside it;
#   train      training throughput of the tokenizer and MaskGIT at the CelebA-64 presets, bf16 and fp32 (TF32),
#              with MFU against the chip's dense peak;
#   vq         the VQ layer (ours vs the peers bench_vq.py knows) in bf16 autocast (4 sizes) and in fp32 (2);
#   sampling   sampling images/s at the CelebA-64 presets (256 tokens): MaskGIT T = 8 / 12 against the
#              autoregressive KV-cache baseline of the same size, bf16;
#   precision  does low precision keep the codes on CUDA: the tiny tokenizer under bf16 and under fp16
#              autocast against fp32, paired by seed (bench_precision.py; vector, fsq and lfq, 2 seeds).
#   compile    (only when named) the train step's bf16 throughput with both models' forward under
#              torch.compile, compile time apart: does compiling pay on this GPU (it does not on a 2-core CPU).
#
#     bash bench/gpu_rows.sh                 # every step; writes runs/bench/gpu/*.json and gpu_rows.md
#     bash bench/gpu_rows.sh sync train      # some steps (gpu_rows_<steps>.md)
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
STEPS=${*:-sync train vq sampling precision}
for s in $STEPS; do
    case $s in sync|train|vq|sampling|precision|compile) ;;
        *) echo "error: unknown step '$s' (sync train vq sampling precision compile)" >&2; exit 2;; esac
done
want() { [[ " $STEPS " == *" $1 "* ]]; }
mkdir -p "$OUT"
REPORT="$OUT/gpu_rows$([ $# -gt 0 ] && echo "_$(echo "$STEPS" | tr ' ' '_')").md"
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

if want sync; then
    step 120 "host syncs" $PY -m pytest -p no:cacheprovider -o addopts= -q tests/test_host_syncs.py
fi
if want train; then
    step 90 "training bf16" $PY bench/bench_train.py --precision bf16 --out "$OUT/train_bf16.json"
    step 90 "training fp32" $PY bench/bench_train.py --precision fp32 --out "$OUT/train_fp32.json"
fi
if want vq; then  # sizes named: the whole --quick grid (K = 65,536, a subprocess per cell) ran past 120 s
    step 120 "VQ layer bf16" $PY bench/bench_vq.py --device cuda --precision bf16 \
        --sizes 16384x64x1024 16384x256x1024 65536x64x1024 16384x64x16384 --out "$OUT/vq_bf16.json"
    step 60 "VQ layer fp32" $PY bench/bench_vq.py --device cuda --precision fp32 \
        --sizes 16384x64x1024 16384x256x1024 --out "$OUT/vq_fp32.json"
fi
if want compile; then
    step 240 "training bf16 compiled" $PY bench/bench_train.py --precision bf16 --compile --out "$OUT/train_bf16_compiled.json"
fi
if want sampling; then
    step 150 "sampling bf16" $PY bench/bench_stage_two.py --configs celeba64:celeba64 --precision bf16 --repeats 5 \
        --out "$OUT/stage_two_bf16.json"
fi
if want precision; then  # six runs at once: the GPU and 16 cores hold them; the thread-count floor is a CPU notion
    for low in bf16 fp16; do
        step 120 "precision $low" $PY bench/bench_precision.py --precision $low --kinds vector fsq lfq --seeds 0 1 \
            --jobs 6 --floor-kinds --out "$OUT/precision_runs"
        cp "$OUT/precision_runs/precision.json" "$OUT/precision_$low.json" 2>/dev/null
    done
fi
echo; echo "-> $REPORT (and the JSON files next to it)"
