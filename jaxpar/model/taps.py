"""A weight's contraction with an activation, and the tapped version zero-bubble schedules use
to split a backward pass into the input gradient (B) and the weight gradient (W)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def einsum(name: str, eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """A weight's contraction with an activation, `jnp.einsum(eq, x, w)`. Every use of a weight
    in a block goes through a function of this signature (`name` is its `BlockWeights` field),
    so the pipeline can swap in one that also hands out what the weight's gradient needs
    (`jaxpar.pipeline.executor`, zero-bubble schedules). A norm's scale is the elementwise
    `SCALE`."""
    del name
    return x * w if eq == SCALE else jnp.einsum(eq, x, w)


SCALE = "BTD,D->BTD"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def tapped(name: str, eq: str, x: jax.Array, w: jax.Array, tap: tuple) -> jax.Array:
    """`einsum(name, eq, x, w)` whose pullback computes the input's cotangent only, and hands the
    weight's gradient its makings instead: the cotangent of `tap` (zeros shaped like x and the
    output) is (x, the output's cotangent). A W tick contracts them (`weight_grad`): the split
    backward of zero-bubble schedules, with nothing recomputed."""
    del tap
    return einsum(name, eq, x, w)


def _tapped_forward(name, eq, x, w, tap):
    del tap
    return einsum(name, eq, x, w), (x, w)


def _tapped_backward(name, eq, residuals, ct):
    x, w = residuals
    dx = jax.vjp(lambda x: einsum(name, eq, x, w), x)[1](ct)[0]
    return dx, jnp.zeros_like(w), (x, ct)


tapped.defvjp(_tapped_forward, _tapped_backward)


def weight_grad(name: str, eq: str, x: jax.Array, ct: jax.Array, w: jax.Array) -> jax.Array:
    """The gradient of one weight from its contraction's input x and output cotangent."""
    return jax.vjp(lambda w: einsum(name, eq, x, w), w)[1](ct)[0]
