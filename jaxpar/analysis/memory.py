"""An analytic estimate of one device's memory for a train step, before anything is compiled.

Persistent state is counted exactly from the shardings: float32 parameters, AdamW's two moments
(same layout) and the gradients (same layout, live during the update). Activations are counted per
token from the tensors the backward pass keeps, as a Megatron-style accounting does, adapted to this
model (RMSNorm, RoPE, GQA, SwiGLU, float32 attention scores, no sequence parallelism):

    kept per layer and token  =  4 D                      residual input and output, two norms
                               + (2 N + 3 K) H / t        q k v, rotated q k, attention output
                               + 4 F / t                  gate, up, silu(gate), their product
                  (in float32)  + N S / t                  attention probabilities

(D model dim, N heads, K kv heads, H head dim, F MLP dim, S sequence, t tensor-parallel size), and
one float32 copy of the logits per token (V / t). A stage keeps these for every layer slot of each
job the schedule holds at once (`Schedule.stash_slots`, or every forward tick for gpipe and
circular, bubbles included), for a micro-batch of b = B / (data x M) rows; with
`model.remat=full` each layer keeps only its input, plus one layer rebuilt during the backward
pass; `dots` keeps the matmul outputs, `dots_no_batch` those without batch dimensions (projections,
not attention). XLA's buffer assignment reuses and fuses buffers, so the compiled figure differs;
`jaxpar analyze` prints both and the difference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from jaxpar.config import Config
from jaxpar.mesh import MeshSpec
from jaxpar.pipeline.schedule import Schedule


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device: the persistent state, the transient gradients and the activations."""

    params_bytes: int
    opt_state_bytes: int
    grads_bytes: int
    activations_bytes: int

    @property
    def state_bytes(self) -> int:
        return self.params_bytes + self.opt_state_bytes

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.grads_bytes + self.activations_bytes

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _layer_elements(config: Config, tensor: int) -> tuple[float, float, float]:
    """(all kept elements, matmul outputs, matmul outputs without batch dims) per layer and token,
    in compute-dtype elements; the float32 attention probabilities count twice in bfloat16."""
    m = config.model
    d, h, n, k, f = m.dim, m.head_dim, m.heads, m.kv_heads, m.mlp_dim
    projections = ((n + 2 * k) * h + 2 * f) / tensor + 2 * d  # qkv, gate/up, out and down
    every = 4 * d + ((2 * n + 3 * k) * h + 4 * f) / tensor
    return every, projections + n * h / tensor, projections


def estimate_memory(
    config: Config, spec: MeshSpec, schedule: Schedule, params_bytes: int, compute_bytes: int
) -> MemoryEstimate:
    """Estimates one device's memory for `config` on the mesh `spec`, run by `schedule`.

    The jobs whose activations a stage keeps at once come from the schedule: every forward tick
    for gpipe and circular (their backward is the transposed scan), the stash ring's slots for
    the schedules with their own backward.

    Args:
        params_bytes: the parameters one device holds (exact, from the shardings).
        compute_bytes: bytes of one element of the compute dtype (4 float32, 2 bfloat16).
    """
    m, t = config.model, config.train
    data, pipeline, tensor = spec.data, spec.pipeline, spec.tensor
    seq, v, remat = t.seq_len, schedule.repeats, m.remat
    chunk = math.ceil(m.layers / (pipeline * v))  # layer slots per job, padding included
    jobs = schedule.stash_slots if schedule.hand_backward else schedule.ticks
    rows = t.batch_size // (data * schedule.microbatches)  # micro-batch rows per replica
    every, dots, dots_no_batch = _layer_elements(config, tensor)
    probs_f32 = m.heads * seq / tensor * (4 - compute_bytes)  # extra bytes, scores kept in f32
    per_token = {
        "none": every * compute_bytes + probs_f32,
        "dots": dots * compute_bytes + m.heads * seq / tensor * 4,
        "dots_no_batch": dots_no_batch * compute_bytes,
        "full": 0.0,
    }[remat]
    job_tokens = rows * seq
    kept = jobs * chunk * job_tokens * (m.dim * compute_bytes + per_token)
    if remat != "none":  # one layer rebuilt in full during the backward pass
        kept += job_tokens * (every * compute_bytes + probs_f32)
    outer_tokens = t.batch_size // (data * pipeline) * seq
    outer = outer_tokens * (4 * m.dim * compute_bytes + m.vocab / tensor * 4)
    held = schedule.microbatches * job_tokens * m.dim * compute_bytes if pipeline > 1 else 0
    opt = 2 * params_bytes  # AdamW: first and second moments, laid out like the parameters
    return MemoryEstimate(
        params_bytes=params_bytes,
        opt_state_bytes=opt,
        grads_bytes=params_bytes,
        activations_bytes=int(kept + outer + held),
    )
