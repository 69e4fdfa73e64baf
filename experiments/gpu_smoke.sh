#!/usr/bin/env bash
# One-GPU smoke check of `jaxpar train` (bfloat16 compute by default on GPU) and a ~350M-parameter
# step-time figure. Run on a GPU host from the repository root; writes logs under ${OUT:-results}.
set -uo pipefail
out="${OUT:-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

echo "== wrong mesh for one GPU (expect exit 2, one line)"
python3 -m jaxpar train --mesh data=2,tensor=4 --out "$out/bad"; echo "exit code $?"

echo "== default model, 100 steps, one GPU"
python3 -m jaxpar train --mesh data=1 train.steps=100 --out "$out/small" 2>&1 | tee "$out/small.log" | tail -12

echo "== ~350M Llama-style model, 30 steps, batch 16 x 1024 tokens"
python3 -m jaxpar train --mesh data=1 model.layers=24 model.dim=1024 model.heads=16 \
    model.kv_heads=8 model.mlp_dim=2816 model.vocab=256 train.batch_size=16 train.seq_len=1024 \
    train.steps=30 train.warmup_steps=5 train.sample_tokens=0 --out "$out/350m" 2>&1 \
    | tee "$out/350m.log" | tail -6
python3 - "$out/350m" <<'PY'
import json, statistics, sys
from jaxpar.config import load_config
run = sys.argv[1]
cfg = load_config(f"{run}/config.yaml")
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")][5:]
t = statistics.median(r["step_time_s"] for r in rows)
m, tokens = cfg.model, cfg.train.batch_size * cfg.train.seq_len
flops = 6 * m.num_params * tokens + 12 * m.layers * cfg.train.seq_len * m.dim * tokens
peak = 989e12  # H100/H200 dense bf16
print(f"params {m.num_params/1e6:.0f}M  median step {t*1e3:.1f} ms  {tokens/t:,.0f} tokens/s  "
      f"model TFLOP/s {flops/t/1e12:.0f}  MFU {flops/t/peak:.1%}")
PY
