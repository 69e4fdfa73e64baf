"""An analytic estimate of one device's peak memory for a train step, before anything is compiled.

Pure arithmetic on the config, the mesh and the schedule (a layout planner calls it thousands of
times). Each term is a set of buffers the compiled step holds at its peak, the end of the forward
pass, where every residual the backward pass reads is live (checked against XLA's buffer
assignment and live ranges, `--xla_dump_to`, at jax 0.10 and 0.12). Sizes per device, with D model
dim, N heads, K kv heads, H head dim, F MLP dim, V vocab, S = T sequence, t tensor, d data, p
pipeline, C context, c layer slots per chunk (the split's largest, `StageLayout.chunk_size`), v
repeats, b micro-batch rows per replica, cb bytes of the compute dtype; weights, their gradients,
attention scores and logits are float32.

Split over `context`, every token count below is T / C per row (each device holds its piece of
the sequence), and attention keeps no scores: the ring keeps each query head's log-sum-exp
(N / t float32 per token) in their place, all_gather (checkpointed) nothing; its scores are
recomputed in the backward pass and counted in `layer_working`. Query blocks on one device
(`model.attention_block`, `attention.flash`) likewise keep the log-sum-exp alone and hold
one block's scores in `layer_working`. cuDNN's fused kernel (`attention="cudnn"`, on GPUs in
half precision) keeps the log-sum-exp too and builds no mask: no term grows with T^2.

Arguments (the state is donated: its outputs are written in place):
    params, opt_state   exact from the shardings; AdamW's two moments are laid out like the
                        parameters.
    batch               the (B / dp, T + 1) int32 token ids.

Temporaries:
    guard_copy          the non-finite guard (`where(finite, new, old)`) needs the old moments
                        after the new ones are written into the donated buffers, so XLA copies
                        both moments at the step's start. The donated buffers are then dead
                        until the update, and buffer assignment puts temporaries into them:
                        the residual stacks no larger than one moment leaf (best fit, one per
                        buffer). The term is the moments less what is placed so.
    grads               the weight-gradient accumulators of the layer stack (and top weights),
                        one per parameter: params bytes.
    derived_weights     the fused weights the layers' matmuls read, built once per step in
                        float32 (`Block.weights`): q k v concatenated and gate up stacked,
                        v c D ((N + 2K) H + 2F) / t (/ d with FSDP); the out and down
                        projections are read in place.
    residuals           what the backward pass reads, stacked by the layer scan over the c slots
                        of a job and, in the tick loop, over the jobs a stage holds: every
                        forward tick for gpipe and circular (v M + P - 1, ramps included), the
                        stash ring's slots for the schedules with their own backward. Per layer
                        and token, by `model.remat` (as XLA's fusions store them):
                          none   6 D (the layer input, the residual sum after attention, and for
                                 each norm its input times rsqrt and that times the scale)
                                 + 2 N H / t (rotated q, attention output) + 2 K H / t (rotated
                                 k, v) + 3 F / t (gate, up and silu(gate) x up: `swiglu`
                                 keeps its inputs) in cb, + N / t float32 (flash attention's
                                 log-sum-exp; 2 N S / t, softmax's exponentials and
                                 probabilities, with the plain einsums);
                          full   the layer input, D;
                          dots_no_batch  the layer input and the weights' matmul outputs:
                                 D + (N + 2K) H / t + 2 F / t + 2 D; dots adds the attention
                                 scores and values, dots_no_batch_attn the attention output.
                        When a tick loop runs (more than one tick), one job's residuals more: the
                        tick's own layer-scan stack, written into the stacks at the end of a
                        forward tick and sliced out of them at the start of a backward one
                        (double-buffered).
    weight_grad_inputs  split backwards only: what a B hands its W (`tapped`), per layer and
                        token each weight's contraction input and output cotangent, 8 D
                        + 2 (N + K) H / t + 3 F / t in cb (q k v, out, gate up, down and the two
                        norm scales), for the W ring's slots, plus the job being written or read
                        where a fused tick runs a B and a W.
    pipeline_buffers    with a tick loop: the replica's micro-batch inputs (gathered over
                        `pipeline`), the last stage's outputs and their cotangent, 3 B / d T D.
    layer_working       one layer's working set: its weights sliced out of the stack for the
                        scan body, d ((2N + 2K) H + 3F) / t float32, and four (b, T, D)
                        activations (its input, the attention and MLP outputs before and after
                        the tensor all-reduce); with query blocks or context, attention's scores
                        in its backward pass (`_attention_working`).
    mask                the causal mask as a float32 fill and a predicate, b N / t T S x 5
                        bytes, built once outside the layer loop (none with query blocks or
                        context: each block masks its own).
    logits              the one-hot embedding input (cb) and the logits and their gradient
                        (float32), B / dp T V / t each.

On the CPU backend temporaries are packed into 32 MiB heaps (`jaxpar.runtime`), which wastes a
little more; `jaxpar analyze` prints the estimate next to XLA's figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from jaxpar.config import Config
from jaxpar.mesh import MeshSpec
from jaxpar.model.attention import query_block
from jaxpar.pipeline.schedule import Schedule, layout_for

F32 = 4  # bytes: float32 (master weights, their gradients, attention scores, logits)
I32 = 4  # bytes: an int32 token id


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device at the step's peak, term by term (the module docstring defines each)."""

    params_bytes: int
    opt_state_bytes: int
    batch_bytes: int
    guard_copy_bytes: int
    grads_bytes: int
    derived_weights_bytes: int
    residuals_bytes: int
    weight_grad_inputs_bytes: int
    pipeline_buffers_bytes: int
    layer_working_bytes: int
    mask_bytes: int
    logits_bytes: int

    @property
    def state_bytes(self) -> int:
        """The step's arguments: parameters, optimizer state and the token batch."""
        return self.params_bytes + self.opt_state_bytes + self.batch_bytes

    @property
    def activations_bytes(self) -> int:
        """What the batch adds: everything that grows with tokens."""
        return (
            self.residuals_bytes + self.weight_grad_inputs_bytes + self.pipeline_buffers_bytes
            + self.layer_working_bytes + self.mask_bytes + self.logits_bytes
        )  # fmt: skip

    @property
    def temp_bytes(self) -> int:
        """Everything but the arguments: XLA's temporaries."""
        return self.total_bytes - self.state_bytes

    @property
    def total_bytes(self) -> int:
        return (
            self.state_bytes + self.guard_copy_bytes + self.grads_bytes
            + self.derived_weights_bytes + self.activations_bytes
        )  # fmt: skip

    def to_json(self) -> dict[str, int]:
        return {
            **asdict(self),
            "activations_bytes": self.activations_bytes,
            "total_bytes": self.total_bytes,
        }


def _kept_per_token(
    config: Config, spec: MeshSpec, compute_bytes: int, attention: str
) -> list[tuple[int, float]]:
    """What one layer keeps for its backward pass per token under `model.remat` with the
    attention implementation `attention`: (how many arrays, bytes per token of each)."""
    m, tensor = config.model, spec.tensor
    d, h, n, k, f, s = m.dim, m.head_dim, m.heads, m.kv_heads, m.mlp_dim, config.train.seq_len
    cb = compute_bytes
    qkv, gate_up = (n + 2 * k) * h / tensor * cb, 2 * f / tensor * cb
    # the weights' matmuls: the layer input, q k v, gate up, and the out and down projections
    projections = [(1, d * cb), (1, qkv), (1, gate_up), (2, d * cb)]
    # what attention itself keeps beyond q, k, v and its output: the softmax over every key, or
    # (split over context) the ring's log-sum-exp per query head, or nothing (all_gather and
    # query blocks are checkpointed: their backward recomputes the scores; cuDNN's kernel keeps
    # the log-sum-exp as its softmax statistics, and `dots` does not keep its outputs at all: the
    # kernel is no dot)
    scores = [(2, n * s / tensor * F32)]
    kernel = spec.context == 1 and attention == "cudnn"
    if spec.context > 1 and m.context_attention == "all_gather":
        scores = []
    elif spec.context > 1 or kernel or _block(config, spec, attention):
        scores = [(1, n / tensor * F32)]
    dots = projections if kernel else [*projections, (1, n * h / tensor * cb), *scores[:1]]
    return {
        "none": [
            (6, d * cb),
            (2, n * h / tensor * cb),
            (2, k * h / tensor * cb),
            (3, f / tensor * cb),
            *scores,
        ],
        "full": [(1, d * cb)],
        "dots": dots,
        "dots_no_batch": projections,
        "dots_no_batch_attn": [*projections, (1, n * h / tensor * cb)],
    }[config.model.remat]


def _block(config: Config, spec: MeshSpec, attention: str) -> int:
    """The query block of attention on one device (`jaxpar.model.attention.query_block`; 0: the
    plain einsums, or not the XLA path)."""
    if attention != "xla":
        return 0
    return query_block(config.train.seq_len // spec.context, config.model.attention_block)


def _attention_working(config: Config, spec: MeshSpec, rows: int, attention: str) -> float:
    """One layer's attention scores live at once in its backward pass, where they are not kept
    as residuals (query blocks, or the sequence split over context).

    The ring computes (3 + 2 (C - 1)) blocks of c x c per device when balanced (3 + 4 (C - 1)
    unbalanced, `jaxpar.model.context`), c = T / 2C, and XLA holds about three float32 arrays
    and a mask byte of every block at once (scores, probabilities, their gradient), its
    optimization barriers notwithstanding; all_gather's backward about four of its (T / C) x T
    scores. Query blocks on one device (no context, `attention.flash`) hold about four float32
    arrays of one block's (block, T) scores, and two bytes per (T, T) pair (the blocks' masks).
    The factors are fitted to XLA's buffer assignment (CPU, jax 0.10) at sequences of 16 to 128
    (the ring's also at 4096). The ring's term is quadratic in T / C: it dominates long
    sequences; a ring that freed each block's scores before the next would make it one block's."""
    m, c = config.model, spec.context
    heads = rows * m.heads / spec.tensor
    seq = config.train.seq_len
    if c == 1:  # (cuDNN's kernel: its blocks stay on chip)
        block = _block(config, spec, attention)
        return heads * seq * (4 * F32 * block + 2 * seq) if block else 0
    if m.context_attention == "ring":
        blocks = 3 + (2 if m.context_load_balance else 4) * (c - 1)
        return blocks * heads * (seq / (2 * c)) ** 2 * (3 * F32 + 1)
    return 4 * heads * seq / c * seq * (F32 + 1)


def _moment_buffers(config: Config, spec: MeshSpec, slots: int) -> list[int]:
    """Bytes of each optimizer-state leaf one device holds (each moment is laid out like its
    parameter; FSDP also splits the weights' model dimension over `data`)."""
    m, t = config.model, spec.tensor
    d, h, n, k, f, v = m.dim, m.head_dim, m.heads, m.kv_heads, m.mlp_dim, m.vocab
    shard = spec.data if config.parallel.fsdp else 1
    weights = [d * n * h, d * k * h, d * k * h, n * h * d, d * f, d * f, d * f]
    leaves = [slots * w // t // shard for w in weights] + [slots * d, slots * d]
    leaves += [v * d // t // shard] * (1 if m.tie_embeddings else 2) + [d]
    return [F32 * x for x in leaves for _ in range(2)]  # AdamW: first and second moments


def _reused(temps: list[float], buffers: list[int]) -> float:
    """Bytes of `temps` XLA can place in `buffers` (dead donated arguments): largest temporary
    first, each in the smallest free buffer that holds it, one per buffer."""
    free = sorted(buffers)
    placed = 0.0
    for size in sorted(temps, reverse=True):
        fit = next((i for i, b in enumerate(free) if b >= size), None)
        if fit is not None:
            placed += size
            free.pop(fit)
    return placed


def estimate_memory(
    config: Config,
    spec: MeshSpec,
    schedule: Schedule,
    params_bytes: int,
    compute_bytes: int,
    attention: str = "xla",
) -> MemoryEstimate:
    """Estimates one device's peak memory for `config` on the mesh `spec`, run by `schedule`:
    arithmetic only, nothing is traced or compiled.

    Args:
        params_bytes: the parameters one device holds (exact, from the shardings).
        compute_bytes: bytes of one element of the compute dtype (4 float32, 2 bfloat16).
        attention: the attention implementation (`jaxpar.model.attention.implementation`).

    Returns:
        The terms in bytes per device (the module docstring defines each).
    """
    m, t = config.model, config.train
    data, pipeline, tensor = spec.data, spec.pipeline, spec.tensor
    shard = data if config.parallel.fsdp else 1  # FSDP splits the weights' D over `data`
    d, h, n, k, f, seq = m.dim, m.head_dim, m.heads, m.kv_heads, m.mlp_dim, t.seq_len
    v, micro = schedule.repeats, schedule.microbatches
    chunk = layout_for(config, pipeline).chunk_size  # layer slots per job: the largest chunk
    slots = v * chunk  # layer slots per stage
    rows = t.batch_size // (data * micro)  # micro-batch rows per replica
    piece = seq // spec.context  # the positions of each row on one device
    job_tokens = rows * piece
    replica_tokens = t.batch_size // data * piece
    outer_tokens = t.batch_size // (data * pipeline) * piece
    cb = compute_bytes

    stacked = schedule.stash_slots if schedule.hand_backward else schedule.ticks
    looped = schedule.hand_backward or schedule.ticks > 1
    stacks = [
        stacked * chunk * job_tokens * per_token
        for count, per_token in _kept_per_token(config, spec, cb, attention)
        for _ in range(count)
    ]
    one_job = sum(stacks) / stacked
    residuals = sum(stacks) + (one_job if looped else 0)
    opt_buffers = _moment_buffers(config, spec, slots)
    opt = 2 * params_bytes  # AdamW: first and second moments, laid out like the parameters
    reused = min(_reused(stacks, opt_buffers), opt)
    layer_weights = d * ((n + 2 * k) * h + n * h + 3 * f) / tensor * F32 / shard
    layer = (layer_weights + 4 * job_tokens * d * cb
             + _attention_working(config, spec, rows, attention))  # fmt: skip
    derived = slots * d * ((n + 2 * k) * h + 2 * f) / tensor * F32 / shard
    pipeline_buffers = 3 * replica_tokens * d * cb if looped else 0
    held_w = schedule.routes.slots["wstash"] if schedule.split else 0
    # per token of a layer: each weight's contraction input and output cotangent (`tapped`)
    taps = 8 * d + (2 * n + 2 * k) * h / tensor + 3 * f / tensor
    # fused ticks also hold the job their B writes while their W reads another
    w_jobs = held_w + (1 if held_w and schedule.granularity == "fused" else 0)
    weight_grad_inputs = w_jobs * chunk * job_tokens * taps * cb
    # one causal mask outside the layer loop; in query blocks or pieces, the blocks' own; none
    # for cuDNN's causal kernel
    whole = spec.context == 1 and attention != "cudnn" and not _block(config, spec, attention)
    mask = rows * n / tensor * seq * seq * (F32 + 1) if whole else 0
    logits = outer_tokens * m.vocab / tensor * (2 * F32 + cb)
    return MemoryEstimate(
        params_bytes=params_bytes,
        opt_state_bytes=opt,
        batch_bytes=outer_tokens // piece * (seq + 1) * I32,
        guard_copy_bytes=int(opt - reused),
        grads_bytes=params_bytes,
        derived_weights_bytes=int(derived),
        residuals_bytes=int(residuals),
        weight_grad_inputs_bytes=int(weight_grad_inputs),
        pipeline_buffers_bytes=int(pipeline_buffers),
        layer_working_bytes=int(layer),
        mask_bytes=int(mask),
        logits_bytes=int(logits),
    )
