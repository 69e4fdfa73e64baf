"""Model sizes that several test files share, so that they compile the same programs: a step
compiled for one file is a hit in the persistent compilation cache for the next (conftest.py),
whichever worker runs it.

`TRAFFIC` is read by the collective and memory accountings (test_comm, test_plan_traffic,
test_analyze): four layers (one per stage at pipeline=4), 8 query and 8 key/value heads and every
sharded size divisible by 8 (tensor=8 works), an MLP wider than the model, float32.
"""

LAYERS, DIM, BATCH, SEQ = 4, 64, 16, 16
TRAFFIC = [
    f"model.layers={LAYERS}", f"model.dim={DIM}", "model.heads=8", "model.kv_heads=8",
    "model.mlp_dim=96", "model.vocab=128", f"train.batch_size={BATCH}", f"train.seq_len={SEQ}",
    "train.dtype=float32",
]  # fmt: skip
