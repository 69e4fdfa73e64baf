"""`jaxpar analyze` and `jaxpar bench`: figures read from the compiled step; their JSON forms."""

import functools
import importlib.util
import json
import math

import jax
import pytest
from sizes import BATCH, LAYERS, SEQ, TRAFFIC

from jaxpar.analysis.comm import megatron_expected_bytes
from jaxpar.analysis.flops import attention_flops, model_flops
from jaxpar.analysis.hlo import dot_flops
from jaxpar.analysis.report import analyze, compiled_figures, placement_estimate
from jaxpar.analysis.timeline import ascii_timeline
from jaxpar.cli import main
from jaxpar.config import load_config
from jaxpar.mesh import make_mesh, parse_mesh
from jaxpar.pipeline.schedule import Schedule
from jaxpar.placement import Placement
from jaxpar.train.bench import peak_flops
from jaxpar.train.step import Trainer


@functools.cache
def analysis(mesh_spec: str, *overrides: str, devices: int = 8):
    config = load_config(None, [*TRAFFIC, *overrides])
    mesh = make_mesh(parse_mesh(mesh_spec), devices=jax.devices()[:devices])
    trainer = Trainer(Placement(config, mesh))
    return trainer, analyze(trainer)


def test_tensor_parallel_collectives_are_megatrons_accounting():
    trainer, a = analysis("data=2,tensor=4")
    over_tensor = [c for c in a.collectives if "tensor" in c.axes]
    # Beyond Megatron's activations and cross-entropy, only 4-byte scalars: the partial sums of
    # each tensor-sharded gradient's squared norm, once for clipping and once for the reported
    # grad_norm.
    (tensor,) = [c for c in over_tensor if c.axes == ("tensor",)]
    assert tensor.kind == "all-reduce"
    b_local = BATCH // 2
    megatron = 4 * LAYERS + 2 + 3  # activations, plus three cross-entropy reductions
    specs = jax.tree.leaves(trainer.placement.param_shardings)
    tensor_sharded = sum("tensor" in jax.tree.leaves(tuple(s.spec)) for s in specs)
    assert tensor_sharded == 9  # q, k, v, o, gate, up, down; embedding and head
    scalars = tensor.count - megatron
    assert scalars == 2 * tensor_sharded
    expected = megatron_expected_bytes(trainer.placement.config.model, b_local, SEQ, act_bytes=4)
    assert tensor.bytes == expected + 4 * scalars
    for c in over_tensor:
        if c is not tensor:
            assert c.kind == "all-reduce" and c.bytes == 4 * c.count, c


def test_parameter_bytes_are_the_sum_of_shard_sizes():
    trainer, a = analysis("data=2,tensor=4")
    params = trainer.init_state().params
    device = trainer.placement.mesh.devices.flat[0]
    on_device = sum(
        shard.data.nbytes
        for x in jax.tree.leaves(params)
        for shard in x.addressable_shards
        if shard.device == device
    )
    assert a.memory.params_bytes == on_device
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert a.memory.params_total_bytes == total
    assert a.estimate.params_bytes == a.memory.params_bytes
    # AdamW keeps two moments per parameter, laid out like it (plus a few scalar counters).
    assert 2 * a.memory.params_bytes <= a.memory.opt_state_bytes <= 2 * a.memory.params_bytes + 64


def test_one_device_flops_match_six_n_t_plus_attention():
    trainer, a = analysis("data=1", devices=1)
    m = trainer.placement.config.model
    tokens = BATCH * SEQ
    # The textbook count: 6 x parameters x tokens (every weight, forward and backward) plus the
    # attention scores and values, 2 x 2 x T x N x H per token and layer forward, x3 with backward.
    attention = 3 * 2 * 2 * SEQ * m.heads * m.head_dim * m.layers * tokens
    textbook = 6 * m.num_params * tokens + attention
    assert a.overhead.flops_per_device == pytest.approx(textbook, rel=0.05)
    # Exactly: norm scales are no matmuls, and the one-hot embedding's input (token ids) needs no
    # gradient, so it costs 4, not 6, x its parameters per token.
    norms = (2 * m.layers + 1) * m.dim
    exact = textbook - 6 * norms * tokens - 2 * m.vocab * m.dim * tokens
    assert model_flops(m, BATCH, SEQ) == a.overhead.ideal_flops_per_device == exact
    # the dots of the compiled step, with their loops' trip counts, are the model's FLOPs and
    # the scores flash attention's backward computes again (`attention.query_block`)
    again = 2 * SEQ * m.heads * m.head_dim * m.layers * tokens
    assert dot_flops(trainer.compile()[0].as_text()) == a.overhead.flops_per_device == exact + again
    assert a.overhead.recomputed_flops_per_device == again
    assert a.bubble_theory == 0 and abs(a.overhead.stack_bubble) < 1e-12


# The smallest model with a layer per stage on 8 stages, grouped-query attention and an MLP wider
# than the model, so that every term of the estimate is there; GPipe with M = 2P when P > 1, as
# experiments/mesh_sweep.py runs it.
ESTIMATE_SIZES = [
    "model.layers=8", "model.dim=64", "model.heads=16", "model.kv_heads=8", "model.mlp_dim=96",
    "model.vocab=128", "train.batch_size=16", "train.seq_len=16", "train.dtype=float32",
    "pipeline.schedule=gpipe",
]  # fmt: skip
# Each axis alone, data with tensor, pipeline with tensor, and all three (experiments/mesh_sweep.py
# compares the estimate on every layout of 8 devices).
LAYOUTS = [(8, 1, 1), (1, 1, 8), (1, 8, 1), (4, 1, 2), (1, 4, 2), (2, 2, 2)]


@pytest.mark.parametrize(("data", "pipeline", "tensor"), LAYOUTS)
def test_memory_estimate_is_within_15_percent_of_the_compiled_peak(data, pipeline, tensor):
    micro = 2 * pipeline if pipeline > 1 else 1
    config = load_config(None, [*ESTIMATE_SIZES, f"pipeline.microbatches={micro}"])
    mesh = make_mesh(parse_mesh(f"data={data},pipeline={pipeline},tensor={tensor}"))
    placement = Placement(config, mesh)
    peak = compiled_figures(Trainer(placement)).memory.peak_bytes  # no `analyze`: one compile
    estimate = placement_estimate(placement)
    assert 0.85 <= estimate.total_bytes / peak <= 1.15, (estimate.to_json(), peak)


@functools.cache
def compiled(*overrides: str):
    """The step of sizes.TRAFFIC laid out by `overrides` (the mesh among them), compiled once:
    test_plan_traffic compiles the same programs (the persistent cache serves the second)."""
    config = load_config(None, [*TRAFFIC, *overrides])
    spec = parse_mesh(config.parallel.mesh)
    placement = Placement(config, make_mesh(spec, jax.devices()[: spec.size]))
    return placement, compiled_figures(Trainer(placement))


CONTEXT_LAYOUTS = [
    ("parallel.mesh=context=4",),
    ("parallel.mesh=context=2", "model.context_attention=all_gather"),
    ("parallel.mesh=data=2,context=2,tensor=2",),
    ("parallel.mesh=pipeline=2,context=2", "pipeline.microbatches=2"),
]


@pytest.mark.parametrize("overrides", CONTEXT_LAYOUTS, ids=lambda o: " ".join(o))
def test_memory_estimate_with_context_is_within_15_percent_of_the_compiled_peak(overrides):
    # With the sequence split, activations are T / C a row and attention keeps O(T / C): the
    # ring's log-sum-exp, no scores; here they are about half of the one-device peak.
    placement, figures = compiled(*overrides)
    estimate = placement_estimate(placement)
    assert 0.85 <= estimate.total_bytes / figures.memory.peak_bytes <= 1.15, (
        estimate.to_json(), figures.memory.peak_bytes
    )  # fmt: skip


# Attention blocks of T / 2C = 2 positions on one device: the blocks the ring computes on C = 4.
BLOCKS = "model.attention_block=2"


def attention(*overrides: str):
    placement, figures = compiled(*overrides)
    return attention_flops(placement, figures.module)


def test_balanced_ring_attention_flops_per_device_are_one_device_s_over_c():
    alone = attention("parallel.mesh=data=1", BLOCKS)
    split = attention("parallel.mesh=context=4", BLOCKS)
    # One device computes all (2C)^2 = 64 blocks of its query blocks' keys, masked ones too
    # (`attention.flash` runs its blocks in one loop); its causal blocks, the 36 on and below
    # the diagonal, are what the ring splits: 9 = 2C + 1 a device, C (2C + 1) = 36 in all.
    causal = alone.computed_per_device * 36 / 64
    assert split.computed_per_device == pytest.approx(causal / 4, rel=0.05)
    assert split.computed_per_device * 64 * 4 == alone.computed_per_device * 36  # exactly
    # every device needs the same causal pairs: 34 of each row's 136
    assert split.useful == (alone.useful[0] / 4,) * 4
    # the dots batched over (rows, heads) are attention's alone: the rest of the step is the
    # model's matmuls (attention's 12 B T^2 N H L taken out), exactly, split over the 4 pieces
    placement, figures = compiled("parallel.mesh=context=4", BLOCKS)
    m = placement.config.model
    rest = model_flops(m, BATCH, SEQ) - 12 * BATCH * SEQ**2 * m.heads * m.head_dim * LAYERS
    assert dot_flops(figures.module) - split.computed_per_device == rest // 4


def test_without_load_balancing_every_device_computes_what_the_busiest_needs():
    balanced = attention("parallel.mesh=context=4", BLOCKS)
    skewed = attention("parallel.mesh=context=4", BLOCKS, "model.context_load_balance=false")
    # pieces in order: the last needs 58 pairs of a row, the first 10, on average 34
    assert skewed.useful_max / skewed.useful_mean == pytest.approx(58 / 34)
    assert balanced.useful_max == balanced.useful_mean == skewed.useful_mean
    # in lockstep every device computes 3 + 4 (C - 1) blocks of c x c, not 3 + 2 (C - 1)
    assert skewed.computed_per_device * 9 == balanced.computed_per_device * 15
    assert skewed.computed_per_device > skewed.useful_max


def test_analyze_json_keys_and_types(capsys, tmp_path):
    png = tmp_path / "timeline.png"
    plots = importlib.util.find_spec("matplotlib") is not None  # the `plot` extra
    args = ["analyze", "--mesh", "data=2,pipeline=2,tensor=2", "--json"]
    args += ["--timeline", str(png)] if plots else []
    assert main([*args, *TRAFFIC, "pipeline.microbatches=2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("flops_per_device", "ideal_flops_per_device", "bubble_theory", "bubble_measured",
                "compile_s", "flops_ratio", "overhead_measured"):  # fmt: skip
        assert isinstance(doc[key], int | float) and not isinstance(doc[key], bool), key
    attention = doc["attention_flops"]
    assert isinstance(attention["computed_per_device"], int)
    assert attention["useful_per_device_max"] == attention["useful_per_device_mean"] > 0
    assert isinstance(doc["flops_per_device"], int)
    assert doc["bubble_theory"] == pytest.approx(1 / 3)
    assert doc["bubble_measured"] == pytest.approx(1 / 3, abs=1e-12)
    memory = doc["memory"]
    for key in ("params_bytes", "opt_state_bytes", "argument_bytes", "output_bytes",
                "temp_bytes", "alias_bytes", "params_total_bytes", "opt_state_total_bytes",
                "peak_bytes"):  # fmt: skip
        assert isinstance(memory[key], int), key
    # Nothing here can be empty: state, batch, outputs and temporaries all take room, and the
    # donated state is written in place.
    assert min(memory[k] for k in memory if k.endswith("_bytes") and k != "alias_bytes") > 0
    assert memory["alias_bytes"] > 0
    assert memory["peak_bytes"] == (
        memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"]
        + memory["temp_bytes"]
    )  # fmt: skip
    assert set(memory["estimate"]) >= {"params_bytes", "activations_bytes", "total_bytes"}
    assert doc["collectives"] and all(
        isinstance(c["kind"], str) and isinstance(c["axis"], str)
        and isinstance(c["count"], int) and isinstance(c["bytes"], int)
        for c in doc["collectives"]
    )  # fmt: skip
    axes = {c["axis"] for c in doc["collectives"] if c["kind"] == "collective-permute"}
    assert axes == {"pipeline"}
    assert [p["spec"] for p in doc["parameters"] if p["name"] == "embed_VD"] == [["tensor", None]]
    if plots:
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    else:  # without matplotlib, --timeline is refused before anything compiles
        assert main(["analyze", "--timeline", str(png)]) == 2
        assert "--timeline needs matplotlib" in capsys.readouterr().err


def test_ascii_timeline_marks_bubbles():
    text = ascii_timeline(Schedule("gpipe", 2, 3))
    assert text.splitlines() == [
        "tick       0  1  2  3  4  5  6  7",
        "stage 0 F  0  1  2  .  .  .  .  .",
        "stage 0 B  .  .  .  .  .  2  1  0",
        "stage 1 F  .  0  1  2  .  .  .  .",
        "stage 1 B  .  .  .  .  2  1  0  .",
        "stage-ticks with no action: 4 of 16 = 25.0%; textbook bubble 25.0%, lockstep with "
        "F = B = W: 25.0%",
    ]
    assert "1b" in ascii_timeline(Schedule("circular", 2, 2, repeats=2))
    zb = ascii_timeline(Schedule("zb_h1", 2, 3)).splitlines()
    assert zb[3] == "stage 0 W  .  .  .  .  .  .  0  1  .  2"  # W's fill the ramp-down


def test_bench_json(capsys):
    args = ["bench", "--mesh", "data=2,tensor=4", "--steps", "2", "--warmup", "1", "--json"]
    assert main([*args, *TRAFFIC]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"] == len(doc["step_times_s"]) == 2
    assert doc["median_step_s"] > 0 and doc["tokens_per_s"] > 0 and doc["compile_s"] > 0
    assert doc["tokens_per_s"] == pytest.approx(BATCH * SEQ / doc["median_step_s"])
    assert doc["mfu"] is None and doc["peak_flops_per_device"] is None  # no known CPU peak
    assert math.isfinite(doc["first_loss"]) and math.isfinite(doc["last_loss"])


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak_flops("NVIDIA H200", "float32") == 67e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert peak_flops("cpu", "float32") is None


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["analyze", "--timeline", "plot.txt"], "--timeline 'plot.txt' must name a .png file"),
        (["analyze", "--timeline", "no/such/dir/t.png"], "folder 'no/such/dir' does not exist"),
        (["bench", "--steps", "0"], "--steps 0 must be at least 1"),
    ],
)
def test_bad_input(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxpar: error: ") and fragment in err and len(err.splitlines()) == 1
