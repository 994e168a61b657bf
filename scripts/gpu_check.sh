#!/usr/bin/env bash
# make gpu-check: the prepared check of one GPU (issue 17; at most ~8 minutes on one H200).
#   (a) (b) (d): bench/gpu_step.py (kernels and the full-width block, plain torch + torchao and the kit's);
#   (c): the kit's pre-training stage on the tiny model, one GPU, NCCL, FP8 off and on: killed after its
#        step-10 checkpoint, resumed to step 20 (synthetic tokens: no shipped shards needed).
# Ends with one JSON line: the bench's figures plus "stage" (per FP8 setting: resumed from, final loss).
# Where the machine's torch lacks names the kit uses, (c) and the kit's block say which, and the
# plain-torch parts still run. Without a GPU it stops in one line.
set -uo pipefail
PY=${PYTHON:-.venv/bin/python}
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
STEPS=20; KILL_AT=10

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "make gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check"
  exit 2
fi
rm -rf "$OUT" && mkdir -p "$OUT"

# ---- (a) (b) (d) ----------------------------------------------------------------------------
timeout 330 "$PY" bench/gpu_step.py > "$OUT/bench.log" 2>&1
tail -n 1 "$OUT/bench.log" > "$OUT/bench.json"

# ---- (c) the kit's stage, killed and resumed ---------------------------------------------------
missing=$("$PY" -c "from bench.gpu_step import missing_kit_torch_names as m; print(', '.join(m()))")
if [ -n "$missing" ]; then
  printf '{"skipped": "kit stage not runnable on torch %s: lacks %s"}\n' \
    "$("$PY" -c 'import torch; print(torch.__version__)')" "$missing" > "$OUT/stage.json"
else
  "$PY" -c "
import json, sys, numpy as np, data
from omegaconf import OmegaConf
m = OmegaConf.load('conf/model/tiny.yaml')
root = sys.argv[1]
import pathlib
for stage in data.STAGES:  # random documents of 16-255 tokens, each ending in eos
    d = pathlib.Path(root) / stage; d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, m.vocab_size, 400_000).astype(np.uint16)
    ends = np.cumsum(rng.integers(16, 256, len(tokens) // 16)); ends = ends[ends < len(tokens)]
    tokens[ends] = 1
    np.save(d / 'shard-00000.npy', tokens)
    (d / 'manifest.json').write_text(json.dumps({'format': data.FORMAT, 'dtype': 'uint16', 'eos_id': 1,
        'vocab_size': m.vocab_size, 'shards': [{'file': 'shard-00000.npy', 'tokens': len(tokens), 'docs': len(ends)}]}))
" "$OUT/data"
  echo "{" > "$OUT/stage.json.tmp"
  for fp8 in false true; do
    run="$OUT/stage_fp8_$fp8"
    args=(stage=pretrain_s1 model=tiny optim=adamw_tiny parallelism=none hardware=h200_node hardware.nodes=1
          hardware.gpus_per_node=1 hardware.procs_per_node=1 hardware.float8=$fp8 hardware.flex_compile=default
          data.root="$OUT/data" run_dir="$run" checkpoint.every_steps=$KILL_AT max_steps=$STEPS)
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 stages/pretrain.py "${args[@]}" > "$run.first.log" 2>&1 &
    pid=$!
    for _ in $(seq 1500); do  # (5 min at most) kill -9 once the step-10 checkpoint is complete (latest points at it)
      [ -f "$run/checkpoints/latest" ] && break
      kill -0 $pid 2>/dev/null || break
      sleep 0.2
    done
    # the worker first (torchrun starts it in a session of its own), then torchrun
    pkill -9 -P $pid 2>/dev/null; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 stages/pretrain.py "${args[@]}" max_steps=$((STEPS - KILL_AT)) \
      > "$run.resume.log" 2>&1
    rc=$?
    resumed=$(grep -o "resumed from [^ ]* at step [0-9]*" "$run.resume.log" | head -1)
    summary=$(tail -n 1 "$run.resume.log")
    [ "$fp8" = true ] && sep="" || sep=","
    printf '"fp8_%s": {"rc": %d, "resumed": "%s", "summary": %s}%s\n' "$fp8" "$rc" "$resumed" \
      "$(echo "$summary" | "$PY" -c 'import json,sys; s=sys.stdin.read().strip()
try: json.loads(s); print(s)
except ValueError: print(json.dumps(s[-300:]))')" "$sep" >> "$OUT/stage.json.tmp"
  done
  echo "}" >> "$OUT/stage.json.tmp" && "$PY" -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" \
    "$OUT/stage.json.tmp" > "$OUT/stage.json"
fi

# ---- one JSON line ---------------------------------------------------------------------------
"$PY" -c "
import json, sys
try:
    bench = json.loads(open(sys.argv[1]).read())
except ValueError:
    bench = {'bench_failed': open(sys.argv[3]).read()[-2000:]}
print(json.dumps({**bench, 'stage': json.load(open(sys.argv[2]))}))
" "$OUT/bench.json" "$OUT/stage.json" "$OUT/bench.log"
