#!/usr/bin/env bash
# The GPU check: one script, one GPU, at most ~5 minutes. See docs/serving.md ("On GPUs").
#
# Here (the CPU machine), once:   benchmarks/gpu_check.sh --prepare
#   copies SmolLM2's tokenizer (a few MB) into .gpu/tokenizer, which git ignores: carry ".gpu".
# With the device tool: run(command="benchmarks/gpu_check.sh", carry=[".gpu"], timeout_s=600).
# There (the GPU machine), from the repository root:
#   benchmarks/gpu_check.sh [OUTDIR]      (OUTDIR defaults to $OUT, else /tmp/gpu_check)
#
# Steps, each failing loudly (the script exits non-zero and says which step failed):
#   1. pytest -m gpu: the graphed step equals the eager one, generate on CUDA equals the CPU,
#      the engine on CUDA (tests/test_gpu.py);
#   2. tp=1 CLI on CUDA with a SmolLM2-shaped random model: generate (bf16 by default; fp32 greedy
#      tokens equal the CPU's), verify --device cuda (tp=1 vs tp=1, compiled vs eager decode);
#      serve over HTTP only where fastapi/uvicorn/llguidance are importable (they are not on the
#      device image: carry wheels, see docs), the in-process engine otherwise (step 3);
#   3. benchmarks/gpu_check.py: top-1 agreement CUDA vs CPU, batch-1 decode tok/s eager / graphs /
#      compiled / compiled+graphs / transformers and their fraction of the bandwidth limit, the
#      engine on the 64-request workload vs transformers' generate_batch.
# One GPU cannot test NCCL across GPUs: the tp>1 path on CUDA (NCCL, the plan broadcast as a
# tensor, captured collectives) is covered only by the structure the CPU torchrun tests share.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .gpu/tokenizer  # .gitignore'd: name it in the device tool's carry
  PY=${PYTHON:-/work/main/.venv/bin/python}
  "$PY" - <<'EOF'
from pathlib import Path
from shardwise.checkpoint.source import resolve
src = resolve("smollm2-135m").tokenizer
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (src / name).exists():
        (Path(".gpu/tokenizer") / name).write_bytes((src / name).read_bytes())
print("copied SmolLM2's tokenizer to .gpu/tokenizer; carry '.gpu' to the GPU machine")
EOF
  exit $?
fi

OUTDIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUTDIR"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
MODELS=/tmp/shardwise-gpu-models
FAILED=()
step() { echo; echo "=== $1 ($(date +%T))"; }
fail() { echo "FAIL: $1"; FAILED+=("$1"); }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || fail "nvidia-smi"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count()); assert torch.cuda.is_available()" \
  || { fail "torch sees no GPU"; echo "FAILED: ${FAILED[*]}"; exit 1; }
"$PY" -c "import torch; n=torch.cuda.device_count(); print('NCCL across GPUs:', 'possible' if n > 1 else 'not testable on one GPU')"

step "1. pytest -m gpu"
timeout 300 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_core.py 2>&1 \
  | tee "$OUTDIR/pytest_gpu.txt" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || fail "pytest -m gpu"

step "2. tp=1 CLI on CUDA (SmolLM2-shaped random model)"
"$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path; from gpu_check import make_model
print(make_model('smollm2-135m', Path('$MODELS'), 'cuda'))" || fail "write the model"
M=$MODELS/smollm2-135m
if [ -f "$M/tokenizer.json" ]; then
  for dev in cuda cpu; do
    timeout 240 "$PY" -m shardwise generate --model "$M" --device $dev --dtype float32 \
      --prompt "The capital of France is" --max-new-tokens 24 --json --no-compile \
      > "$OUTDIR/generate_fp32_$dev.json" || fail "generate --device $dev --dtype float32"
  done
  timeout 240 "$PY" -m shardwise generate --model "$M" --prompt "The capital of France is" \
    --max-new-tokens 64 --json > "$OUTDIR/generate_auto.json" || fail "generate (auto: cuda bf16, compiled + graphs)"
  "$PY" - "$OUTDIR" <<'EOF' || fail "generate: CUDA fp32 tokens vs CPU, device and dtype by default"
import json, sys
d = sys.argv[1]
cuda, cpu, auto = (json.load(open(f"{d}/generate_{n}.json")) for n in ("fp32_cuda", "fp32_cpu", "auto"))
r = auto["signals"]["ranks"][0]
print("fp32 greedy tokens CUDA == CPU:", cuda["token_ids"] == cpu["token_ids"])
print(f"auto: device {r['device']}, dtype {r['dtype']}, {r['graphs']} graph(s), decode "
      f"{auto['signals']['decode_tokens_per_s']} tok/s")
assert cuda["token_ids"] == cpu["token_ids"], (cuda["token_ids"], cpu["token_ids"])
assert r["device"] == "cuda:0" and r["dtype"] == "bfloat16" and r["graphs"] >= 1, r
EOF
else
  fail "no tokenizer in $M: run 'benchmarks/gpu_check.sh --prepare' on the CPU machine and carry .gpu"
fi
timeout 240 "$PY" -m shardwise verify --model "$M" --tp 1 --device cuda | tee "$OUTDIR/verify.txt" \
  || fail "verify --device cuda (compiled vs eager decode on CUDA)"
if "$PY" -c "import fastapi, uvicorn, llguidance" 2>/dev/null && [ -f "$M/tokenizer.json" ]; then
  PORT=18123
  "$PY" -m shardwise serve --model "$M" --port $PORT > "$OUTDIR/serve.log" 2>&1 &
  SPID=$!
  for _ in $(seq 120); do curl -sf localhost:$PORT/health > /dev/null && break; sleep 1; done
  curl -sf localhost:$PORT/v1/completions -H 'content-type: application/json' \
    -d '{"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 16}' \
    | tee "$OUTDIR/serve_answer.json" || fail "serve over HTTP on CUDA"
  kill -TERM $SPID; wait $SPID
  grep -q "cuda:0, bfloat16" "$OUTDIR/serve.log" || fail "serve did not run on cuda:0 in bf16"
else
  echo "serve over HTTP: not checked (fastapi, uvicorn or llguidance absent here); the engine runs in-process in step 3"
fi

step "3. measurements (benchmarks/gpu_check.py)"
timeout 420 "$PY" benchmarks/gpu_check.py --models "$MODELS" --out "$OUTDIR/gpu_check.json" --check \
  || fail "gpu_check.py (see its 'failures')"

echo
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "GPU CHECK FAILED: ${FAILED[*]}"
  exit 1
fi
echo "GPU CHECK OK (results in $OUTDIR)"
