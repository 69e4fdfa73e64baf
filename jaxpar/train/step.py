"""The training state, the optimizer, and the jitted train step with in/out shardings.

`Trainer` places a model on a mesh: it resolves every parameter's logical axes through the rules
into a `NamedSharding`, derives the optimizer state's shardings from them, initialises the state
directly into those shardings (no full copy on one device), and compiles the step with
`jax.jit(in_shardings=..., out_shardings=..., donate_argnums=0)`: what `pjit` became.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxpar.analysis.flops import ComputeOverhead, layer_stack_flops, model_flops
from jaxpar.analysis.hlo import HloModule, dot_flops
from jaxpar.config import Config, TrainConfig
from jaxpar.mesh import mesh_spec_of
from jaxpar.model.llama import Llama, cross_entropy
from jaxpar.pipeline.executor import run_pipeline
from jaxpar.pipeline.layout import StageLayout
from jaxpar.pipeline.schedule import Schedule
from jaxpar.sharding import NORM, OUTER_BATCH, Rules, rules_for


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def compute_dtype(name: str) -> jnp.dtype:
    """`auto` is float32 on CPU (exact comparisons) and bfloat16 on accelerators."""
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.lr,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def _logical_axes(v: nnx.Variable) -> tuple[str, ...]:
    return v.get_metadata()["logical_axes"]


def make_optimizer(cfg: TrainConfig, abstract_params: nnx.State) -> optax.GradientTransformation:
    """AdamW (no decay on norm scales) after global-norm clipping."""
    decay_mask = jax.tree.map(
        lambda v: v.replace(NORM not in _logical_axes(v)),
        abstract_params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(
            lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask
        ),
    )


@dataclass
class Trainer:
    """A model, its optimizer and its train step, laid out on a mesh by a rules preset.

    The layer stack always runs through the pipeline executor: with pipeline=1 its schedule is
    plain micro-batching (gradient accumulation), so one config runs on every mesh.

    Attributes:
        config: the resolved config.
        mesh: the device mesh (axes data, pipeline, tensor).
        rules: the logical-to-mesh preset; by default chosen from the mesh and `parallel.fsdp`.
    """

    config: Config
    mesh: jax.sharding.Mesh
    rules: Rules | None = None

    def __post_init__(self) -> None:
        spec = mesh_spec_of(self.mesh)
        if self.rules is None:
            self.rules = rules_for(spec.data, spec.pipeline, spec.tensor, self.config.parallel.fsdp)
        pipe = self.config.pipeline
        self.layout = StageLayout(self.config.model.layers, spec.pipeline, pipe.repeats)
        self.schedule = Schedule(pipe.schedule, spec.pipeline, pipe.microbatches, pipe.repeats)
        self.dtype = compute_dtype(self.config.train.dtype)
        abstract = nnx.eval_shape(lambda: self._new_model(0))
        self.graphdef, self.abstract_params = nnx.split(abstract)
        self.tx = make_optimizer(self.config.train, self.abstract_params)
        self.lr = lr_schedule(self.config.train)

    def _new_model(self, seed: int) -> Llama:
        assert self.rules is not None
        return Llama(self.config.model, self.rules, rngs=nnx.Rngs(params=seed), layout=self.layout)

    @cached_property
    def param_shardings(self) -> nnx.State:
        """A tree like the params with a NamedSharding in place of each array."""
        assert self.rules is not None
        rules = self.rules
        return jax.tree.map(
            lambda v: v.replace(NamedSharding(self.mesh, rules.spec(_logical_axes(v)))),
            self.abstract_params,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )

    @cached_property
    def state_shardings(self) -> TrainState:
        replicated = NamedSharding(self.mesh, PartitionSpec())
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        opt = optax.tree_map_params(
            self.tx,
            lambda _, sharding: sharding,
            abstract_opt,
            self.param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        return TrainState(step=replicated, params=self.param_shardings, opt_state=opt)

    @property
    def batch_sharding(self) -> NamedSharding:
        assert self.rules is not None
        return NamedSharding(self.mesh, self.rules.spec((OUTER_BATCH, None)))

    def _init(self, seed: int) -> TrainState:
        _, params = nnx.split(self._new_model(seed))
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

    @cached_property
    def _jitted_init(self) -> Any:
        return jax.jit(self._init, static_argnums=0, out_shardings=self.state_shardings)

    def init_state(self, seed: int | None = None) -> TrainState:
        """Initialises parameters and optimizer state straight into their shardings."""
        seed = self.config.train.seed if seed is None else seed
        with jax.set_mesh(self.mesh):
            return self._jitted_init(seed)

    def loss(self, params: nnx.State, tokens_BT: jax.Array) -> jax.Array:
        """Next-token loss of a (B, T+1) batch: predict tokens 1..T from tokens 0..T-1."""
        return cross_entropy(self.logits(params, tokens_BT[:, :-1]), tokens_BT[:, 1:])

    def logits(self, params: nnx.State, tokens_BT: jax.Array) -> jax.Array:
        """float32 logits (B, T, V) through the pipeline executor, as the train step runs them."""
        model = nnx.merge(self.graphdef, params)
        x_BTD = model.embed(tokens_BT, self.dtype)
        blocks_graphdef, blocks_state = nnx.split(model.blocks)
        x_BTD = run_pipeline(
            blocks_graphdef,
            blocks_state,
            x_BTD,
            mesh=self.mesh,
            schedule=self.schedule,
            layout=self.layout,
            remat=self.config.pipeline.remat,
            fsdp=self.config.parallel.fsdp,
        )
        return model.logits(x_BTD)

    def _step(
        self, state: TrainState, tokens_BT: jax.Array, poison: jax.Array
    ) -> tuple[TrainState, dict]:
        def loss(params: nnx.State) -> jax.Array:
            return self.loss(params, tokens_BT) + poison  # poison: 0, or NaN to test the guard

        value, grads = jax.value_and_grad(loss)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient skips the update: parameters and optimizer state stay as
        # they were, and only the data position (the step) moves on.
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        metrics = {
            "loss": value,
            "grad_norm": grad_norm,
            "lr": self.lr(state.step),
            "skipped": ~finite,
        }
        return TrainState(state.step + 1, params, opt_state), metrics

    @cached_property
    def jitted_step(self) -> Any:
        """The jitted step; trace it under `jax.set_mesh(self.mesh)` (as `lower` does)."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(
            self._step,
            in_shardings=(self.state_shardings, self.batch_sharding, replicated),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )

    def batch_shape(self) -> tuple[int, int]:
        t = self.config.train
        return (t.batch_size, t.seq_len + 1)

    def lower(self) -> jax.stages.Lowered:
        """Lowers the train step for abstract inputs (nothing is allocated or run)."""
        abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.init_state_abstract(),
            self.state_shardings,
        )
        tokens = jax.ShapeDtypeStruct(self.batch_shape(), jnp.int32, sharding=self.batch_sharding)
        poison = jax.ShapeDtypeStruct(
            (), jnp.float32, sharding=NamedSharding(self.mesh, PartitionSpec())
        )
        with jax.set_mesh(self.mesh):
            return self.jitted_step.lower(abstract_state, tokens, poison)

    def init_state_abstract(self) -> TrainState:
        """Shapes and dtypes of the state, without allocating it."""
        return jax.eval_shape(lambda: self._init(0))

    @cached_property
    def _compiled(self) -> tuple[jax.stages.Compiled, float]:
        start = time.perf_counter()
        compiled = self.lower().compile()
        return compiled, time.perf_counter() - start

    def compile(self) -> tuple[jax.stages.Compiled, float]:
        """The compiled train step (compiled once) and the seconds its compilation took."""
        return self._compiled

    def step(
        self, state: TrainState, tokens_BT: jax.Array, poison: float = 0.0
    ) -> tuple[TrainState, dict]:
        """One update on a (B, T+1) token batch laid out by `batch_sharding`; donates `state`.

        `poison` is added to the loss (NaN injects a fault for the non-finite guard).
        """
        replicated = NamedSharding(self.mesh, PartitionSpec())
        poison_arr = jax.device_put(jnp.float32(poison), replicated)
        return self._compiled[0](state, tokens_BT, poison_arr)

    def compute_overhead(self, hlo: str | HloModule | None = None) -> ComputeOverhead:
        """The compiled step's per-device matmul FLOPs (trip counts applied) against the ideal.

        `hlo` is the compiled step's HLO, when the caller has it parsed already."""
        m, t, n = self.config.model, self.config.train, self.mesh.devices.size
        return ComputeOverhead(
            flops_per_device=dot_flops(self.compile()[0].as_text() if hlo is None else hlo),
            ideal_flops_per_device=model_flops(m, t.batch_size, t.seq_len) / n,
            ideal_stack_flops_per_device=layer_stack_flops(m, t.batch_size, t.seq_len) / n,
        )
