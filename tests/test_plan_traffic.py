"""`predict_traffic` against the collectives of the compiled train step, layout by layout."""

import jax
import pytest
from sizes import TRAFFIC

from jaxpar.analysis.comm import megatron_expected_bytes
from jaxpar.analysis.report import compiled_figures, placement_estimate
from jaxpar.config import load_config
from jaxpar.mesh import make_mesh, parse_mesh
from jaxpar.placement import Placement
from jaxpar.plan.traffic import predict_traffic
from jaxpar.train.step import Trainer

LAYOUTS = {
    "data+tensor": ["parallel.mesh=data=2,tensor=4"],
    "fsdp": ["parallel.mesh=data=8", "parallel.fsdp=true"],
    "3d-gpipe": ["parallel.mesh=data=2,pipeline=2,tensor=2", "pipeline.microbatches=2"],
    "3d-1f1b": [
        "parallel.mesh=data=2,pipeline=2,tensor=2", "pipeline.schedule=1f1b",
        "pipeline.microbatches=4",
    ],
    "pipeline-zb_v": [
        "parallel.mesh=pipeline=4", "pipeline.schedule=zb_v", "pipeline.repeats=2",
        "pipeline.microbatches=4", "model.layers=8",
    ],
    "pipeline-interleaved": [
        "parallel.mesh=pipeline=4", "pipeline.schedule=interleaved_1f1b", "pipeline.repeats=2",
        "pipeline.microbatches=4", "model.layers=8",
    ],
    "pipeline+fsdp": [
        "parallel.mesh=data=4,pipeline=2", "parallel.fsdp=true", "pipeline.microbatches=2",
    ],
    # the sequence split over context: the ring's permutes, all_gather's all-to-alls, and the
    # gradients and loss summed over context as well (sizes.TRAFFIC's 16 positions: C up to 8)
    "context-ring": ["parallel.mesh=context=4"],
    "context-all_gather": ["parallel.mesh=context=2", "model.context_attention=all_gather"],
    "data+context+tensor": ["parallel.mesh=data=2,context=2,tensor=2"],
    "pipeline+context-gpipe": ["parallel.mesh=pipeline=2,context=2", "pipeline.microbatches=2"],
}  # fmt: skip


def config_for(name: str, *more: str):
    return load_config(None, [*TRAFFIC, *LAYOUTS[name], *more])


def compiled_traffic(config, with_memory: bool = False):
    spec = parse_mesh(config.parallel.mesh)
    placement = Placement(config, make_mesh(spec, jax.devices()[: spec.size]))
    figures = compiled_figures(Trainer(placement))
    traffic = {(t.kind, t.axis): (t.count, t.bytes) for t in figures.collectives}
    if not with_memory:
        return traffic
    return traffic, placement_estimate(placement).total_bytes / figures.memory.peak_bytes


def predicted(config) -> dict[tuple[str, str], tuple[int, int]]:
    spec = parse_mesh(config.parallel.mesh)
    return {(t.kind, t.axis): (t.count, t.bytes) for t in predict_traffic(config, spec, 4)}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_prediction_equals_the_compiled_step(name):
    config = config_for(name)
    # Bytes and counts per (kind, axes), every collective of the step: nothing missing or extra.
    traffic, memory = compiled_traffic(config, with_memory=True)
    assert predicted(config) == traffic
    # and the planner's memory estimate of the same program (test_analyze checks more layouts)
    assert 0.85 <= memory <= 1.15, memory


def test_remat_full_recomputes_one_tensor_all_reduce_per_layer():
    config = config_for("data+tensor", "model.remat=full")
    assert predicted(config) == compiled_traffic(config)


def test_tensor_traffic_without_stages_is_megatrons_plus_the_grad_norm():
    config = config_for("data+tensor", "pipeline.microbatches=2")
    tensor = {t.axis: t for t in predict_traffic(config, parse_mesh("data=2,tensor=4"), 4)}
    # 18 scalars: the squared norms of the 9 tensor-split parameters, for the metrics and the clip.
    assert tensor["tensor"].bytes == megatron_expected_bytes(config.model, 8, 16, 4) + 18 * 4
    assert tensor["tensor"].count == 4 * 4 * 2 + 5 + 18  # 4 layers x 2 micro-batches


def test_bfloat16_halves_activations_not_gradients():
    config = config_for("3d-gpipe", "train.dtype=bfloat16")
    spec = parse_mesh(config.parallel.mesh)
    f32 = {(t.kind, t.axis): t.bytes for t in predict_traffic(config, spec, 4)}
    bf16 = {(t.kind, t.axis): t.bytes for t in predict_traffic(config, spec, 2)}
    for key in [("collective-permute", "pipeline"), ("all-to-all", "pipeline")]:
        assert bf16[key] * 2 == f32[key]
    for key in [("all-reduce", "data"), ("all-reduce", "data,pipeline")]:
        assert bf16[key] == f32[key]
