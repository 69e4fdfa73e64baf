#!/usr/bin/env bash
# One-GPU smoke check of `jaxpar train` (bfloat16 compute by default on GPU) and a ~284M-parameter
# step time with MFU (`jaxpar bench`). Run on a GPU host from the repository root; writes logs
# under experiments/results/ (or $OUT).
set -uo pipefail
out="${OUT:-$(cd "$(dirname "$0")" && pwd)/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

echo "== wrong mesh for one GPU (expect exit 2, one line)"
python3 -m jaxpar train --mesh data=2,tensor=4 --out "$out/bad"; echo "exit code $?"

echo "== default model, 100 steps, one GPU"
python3 -m jaxpar train --mesh data=1 train.steps=100 --out "$out/small" 2>&1 | tee "$out/small.log" | tail -12

echo "== ~284M Llama-style model: jaxpar bench, batch 16 x 1024 tokens (MFU and HFU)"
python3 -m jaxpar bench --mesh data=1 model.layers=24 model.dim=1024 model.heads=16 \
    model.kv_heads=8 model.mlp_dim=2816 model.vocab=256 train.batch_size=16 train.seq_len=1024 \
    --steps 20 --warmup 3 2>&1 | tee "$out/284m.log" | tail -1
