"""How a model sits on a mesh, and nothing else: the one object training, serving, checkpoints,
Hugging Face interop and `analyze` all take.

A `Placement` turns a config and a mesh into the rules preset (logical -> mesh axes), the stage
layout, the schedule, the compute dtype, the attention implementation, the model's graphdef and
abstract parameters, and the parameters' and batch's shardings. It checks the config against the
mesh when it is built, so a layout that cannot work fails at once with one line. It knows no
optimizer (`jaxpar.train.step.Trainer` adds one) and no cache (`jaxpar.infer.engine.Generator`
adds one).

Parameters are stored in the stage layout ([P, v * c, ...] for the blocks); `to_logical` and
`from_logical` convert any tree holding them (parameters, optimizer moments) to and from the
logical layer order [L, ...] that checkpoints keep and that any other placement can read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxpar.config import Config, check_stage_split, validate_for_mesh, validate_model_for_mesh
from jaxpar.errors import JaxparError
from jaxpar.mesh import MeshSpec, mesh_spec_of
from jaxpar.model import attention
from jaxpar.model.context import sequence_order
from jaxpar.model.layout import StageLayout
from jaxpar.model.llama import (
    BlockWeights,
    Llama,
    Project,
    TopWeights,
    cross_entropy,
    embed,
    logits,
    token_nll,
)
from jaxpar.model.taps import einsum
from jaxpar.pipeline.executor import run_pipeline, run_train_program
from jaxpar.pipeline.schedule import Schedule, layout_for, schedule_for
from jaxpar.sharding import OUTER_BATCH, Rules, rules_for, serving_rules


def compute_dtype(name: str) -> jnp.dtype:
    """`auto` is float32 on CPU (exact comparisons) and bfloat16 on accelerators."""
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def serving_config(config: Config) -> Config:
    """The config with the training-only layout settings reset: plain rules, one chunk per stage."""
    return config.replace(**{
        "parallel.fsdp": False, "pipeline.schedule": "gpipe", "pipeline.repeats": 1,
        "pipeline.microbatches": 1, "pipeline.tick": "auto", "model.remat": "none",
    })  # fmt: skip


def logical_axes(v: nnx.Variable) -> tuple[str, ...]:
    return v.get_metadata()["logical_axes"]


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _in_blocks(path: tuple[Any, ...]) -> bool:
    return any(getattr(k, "key", None) == "blocks" for k in path)


@dataclass(frozen=True)
class Placement:
    """A model config laid out on a mesh; frozen, with what it derives from the config and the
    mesh as fields (`dataclasses.replace` derives them again).

    Attributes:
        config: the config (for serving, with the training-only layout settings reset).
        mesh: the device mesh (axes `jaxpar.mesh.AXES`).
        serving: lay the model out for inference: the rules keep the embedding's and head's batch
            over `data` only (a serving batch need not divide over `data` x `pipeline`), one chunk
            of layers per stage, no FSDP, and only the model's sizes are checked against the mesh.
        spec: the mesh's axis sizes.
        rules: the rules preset mapping logical axes to mesh axes.
        layout: which layers each pipeline stage holds.
        schedule: the pipeline schedule's table.
        dtype: the compute dtype (`train.dtype` resolved).
        attention: the attention implementation (`model.attention` resolved).
        graphdef: the model's NNX graph definition (not in `repr`).
        abstract_params: the parameters' shapes and logical axes (not in `repr`).

    Raises:
        JaxparError: the config does not fit the mesh (a size that does not divide, too few
            layers for the stages, a batch the micro-batches do not split, ...).
    """

    config: Config
    mesh: jax.sharding.Mesh
    serving: bool = False
    # Derived in __post_init__ from the three fields above (so not compared: they follow them).
    spec: MeshSpec = field(init=False, compare=False)
    rules: Rules = field(init=False, compare=False)
    layout: StageLayout = field(init=False, compare=False)
    schedule: Schedule = field(init=False, compare=False)
    dtype: jnp.dtype = field(init=False, compare=False)
    attention: str = field(init=False, compare=False)
    graphdef: nnx.GraphDef = field(init=False, compare=False, repr=False)
    abstract_params: nnx.State = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        derive = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        spec = mesh_spec_of(self.mesh)
        derive("spec", spec)
        if self.serving:
            derive("config", serving_config(self.config))
            validate_model_for_mesh(self.config.model, spec)
            check_stage_split(self.config.pipeline.split, self.config.model.layers,
                              spec.pipeline, 1)  # fmt: skip
            derive("rules", serving_rules(rules_for(spec, fsdp=False)))
        else:
            validate_for_mesh(self.config, spec)
            derive("rules", rules_for(spec, self.config.parallel.fsdp))
        m = self.config.model
        derive("layout", layout_for(self.config, spec.pipeline))
        derive("schedule", schedule_for(self.config, spec.pipeline))
        derive("dtype", compute_dtype(self.config.train.dtype))
        derive("attention", attention.resolve(m.attention, m.heads, m.kv_heads, m.head_dim,
                                              self.dtype))  # fmt: skip
        graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: self.new_model(0)))
        derive("graphdef", graphdef)
        derive("abstract_params", abstract_params)

    def new_model(self, seed: int) -> Llama:
        """The model with parameters drawn from `seed` (call inside jit with out_shardings to
        create them straight into `param_shardings`)."""
        return Llama(
            self.config.model, self.rules, rngs=nnx.Rngs(params=seed), layout=self.layout,
            attention=self.attention,
        )  # fmt: skip

    # -- shardings ---------------------------------------------------------------------------

    @cached_property
    def param_shardings(self) -> nnx.State:
        """A tree like the params with a NamedSharding in place of each array."""
        return jax.tree.map(
            lambda v: v.replace(NamedSharding(self.mesh, self.rules.spec(logical_axes(v)))),
            self.abstract_params,
            is_leaf=_is_variable,
        )

    @property
    def batch_sharding(self) -> NamedSharding:
        """A (B, T) token batch: rows over the axes the embedding's batch is on."""
        return NamedSharding(self.mesh, self.rules.spec((OUTER_BATCH, None)))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def abstract(self, tree: Any, shardings: Any) -> Any:
        """`tree`'s arrays (or shapes) as ShapeDtypeStructs carrying `shardings` (a matching tree):
        what `lower` and orbax's restore take."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
        )

    # -- the forward pass --------------------------------------------------------------------

    def sequence_order(self, seq: int) -> np.ndarray | None:
        """The order a sequence of `seq` tokens is stored in when it is split over `context`
        (`jaxpar.model.context.sequence_order`); None when it is not split."""
        if self.spec.context == 1:
            return None
        return sequence_order(seq, self.spec.context, self.config.model.context_load_balance)

    def logits(self, params: nnx.State, tokens_BT: jax.Array) -> jax.Array:
        """float32 logits (B, T, V) through the pipeline executor, as the train step runs them."""
        order = self.sequence_order(tokens_BT.shape[1])
        if order is None:
            return self._logits(params, tokens_BT)
        return self._logits(params, tokens_BT[:, order])[:, np.argsort(order)]

    def _logits(self, params: nnx.State, tokens_BT: jax.Array) -> jax.Array:
        """The logits of tokens in their stored order (see `sequence_order`).

        The blocks' fused weights are derived once here, for every tick and layer; they stay in
        float32 and each matmul casts its weight to the compute dtype, so that the gradients the
        ticks accumulate for them are summed in float32."""
        model = nnx.merge(self.graphdef, params)
        x_BTD = model.embed(tokens_BT, self.dtype)

        def layer(w: BlockWeights, h_bTD: jax.Array) -> jax.Array:
            return model.blocks.apply(w, h_bTD)[0]

        x_BTD = run_pipeline(
            layer,
            model.blocks.weights(jnp.float32),
            x_BTD,
            mesh=self.mesh,
            schedule=self.schedule,
            layout=self.layout,
            remat=self.config.model.remat,
            fsdp=self.config.parallel.fsdp,
        )
        return model.logits(x_BTD)

    def loss(self, params: nnx.State, tokens_BT: jax.Array) -> jax.Array:
        """Next-token loss of a (B, T+1) batch: predict tokens 1..T from tokens 0..T-1.

        For schedules with their own backward (1f1b, interleaved_1f1b, zb_h1) the layer stack,
        embedding and head are one `jax.custom_vjp`: its forward rule runs the schedule's whole
        program, which returns the gradients with the loss, so `jax.grad` of this function runs
        the hand-written per-tick backward and nothing else. Without differentiation (eval) it
        runs the forward ticks alone."""
        inputs_BT, targets_BT = tokens_BT[:, :-1], tokens_BT[:, 1:]
        order = self.sequence_order(inputs_BT.shape[1])
        if order is not None:  # the mean over tokens does not depend on their order
            inputs_BT, targets_BT = inputs_BT[:, order], targets_BT[:, order]
        if not self.schedule.hand_backward:
            return cross_entropy(self._logits(params, inputs_BT), targets_BT)
        model = nnx.merge(self.graphdef, params)
        stack_loss = self._stack_loss(model)
        total = stack_loss(model.blocks.weights(jnp.float32), model.top(), inputs_BT, targets_BT)
        return total / inputs_BT.size

    def _stack_loss(self, model: Llama) -> Any:
        """The summed loss of (weights, top, inputs, targets) with the program as its VJP."""
        rules, dtype, eps = self.rules, self.dtype, self.config.model.norm_eps
        pipe = dict(
            mesh=self.mesh, schedule=self.schedule, layout=self.layout,
            remat=self.config.model.remat, fsdp=self.config.parallel.fsdp,
        )  # fmt: skip

        def layer(w: BlockWeights, h_bTD: jax.Array, project: Project = einsum) -> jax.Array:
            return model.blocks.apply(w, h_bTD, project=project)[0]

        def head(top: TopWeights, y_bTD: jax.Array, targets_bT: jax.Array) -> jax.Array:
            return jnp.sum(token_nll(logits(top, y_bTD, eps, rules), targets_bT))

        @jax.custom_vjp
        def stack_loss(weights: BlockWeights, top: TopWeights, inputs_BT, targets_BT):
            x_BTD = embed(top, inputs_BT, dtype, rules, OUTER_BATCH)
            y_BTD = run_pipeline(layer, weights, x_BTD, **pipe)
            return jnp.sum(token_nll(logits(top, y_BTD, eps, rules, OUTER_BATCH), targets_BT))

        def forward(weights, top, inputs_BT, targets_BT):
            loss, d_weights, d_top = run_train_program(
                layer, weights, top, inputs_BT, targets_BT,
                embed=lambda top, tokens_bT: embed(top, tokens_bT, dtype, rules), head=head,
                **pipe,
            )  # fmt: skip
            return loss, (d_weights, d_top)

        def backward(grads: tuple, g: jax.Array) -> tuple:
            d_weights, d_top = jax.tree.map(lambda a: a * g, grads)
            return d_weights, d_top, None, None

        stack_loss.defvjp(forward, backward)
        return stack_loss

    # -- layouts -----------------------------------------------------------------------------

    def to_logical(self, tree: Any) -> Any:
        """`tree` (any tree of arrays whose paths pass through `blocks`: parameters, optimizer
        moments, a train state) with the blocks' [P, v * c, ...] in logical order [L, ...]."""
        layout = self.layout
        return jax.tree_util.tree_map_with_path(
            lambda path, x: layout.to_logical(x) if _in_blocks(path) else x, tree
        )

    def from_logical(self, tree: Any) -> Any:
        """The inverse of `to_logical`: blocks from [L, ...] into this placement's stage layout."""
        layout = self.layout
        return jax.tree_util.tree_map_with_path(
            lambda path, x: layout.to_stages(x) if _in_blocks(path) else x, tree
        )

    def logical_abstract(self, abstract: Any) -> Any:
        """ShapeDtypeStructs of `to_logical(tree)` for a tree given as ShapeDtypeStructs with this
        placement's shardings: the blocks' leading axes become [L] (replicated), the rest keep
        their shardings."""
        layers = self.config.model.layers

        def logical(path, x):
            if not _in_blocks(path):
                return x
            spec = PartitionSpec(None, *x.sharding.spec[2:])
            sharding = NamedSharding(self.mesh, spec)
            return jax.ShapeDtypeStruct((layers, *x.shape[2:]), x.dtype, sharding=sharding)

        return jax.tree_util.tree_map_with_path(logical, abstract)

    def relayout(self, tree: Any, source: Placement, shardings: Any = None) -> Any:
        """`tree` (parameters, or a train state) laid out by `source` (same model, same mesh),
        moved into this placement's stage layout and `shardings` (default: the parameters')."""
        if dataclasses.asdict(source.config.model) != dataclasses.asdict(self.config.model):
            raise JaxparError("relayout needs the same model on both placements")
        move = jax.jit(
            lambda tree: self.from_logical(source.to_logical(tree)),
            out_shardings=self.param_shardings if shardings is None else shardings,
        )
        with jax.set_mesh(self.mesh):
            return move(tree)
