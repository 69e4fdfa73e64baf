"""The closing sample of `jaxpar train`: what the trained byte-token model writes after a prompt,
generated with the serving engine on the training mesh."""

from __future__ import annotations

from flax import nnx

from jaxpar.infer.engine import Generator
from jaxpar.infer.sampling import Sampling
from jaxpar.placement import Placement


def sample_text(
    placement: Placement, params: nnx.State, prompt: str, tokens: int, seed: int
) -> tuple[str, int]:
    """`prompt` and what a trained byte-token model writes after it (at the default temperature),
    with the KV-cached engine on the training mesh: the end-of-training sample.

    `params` are laid out by the training `placement`; they are moved into the serving layout of
    the same mesh first. At most the context (`train.seq_len`) is filled.

    Returns:
        the text, and how many tokens were generated.
    """
    serving = Placement(placement.config, placement.mesh, serving=True)
    ids = list(prompt.encode())
    room = placement.config.train.seq_len - len(ids)
    if not ids or room < 1:
        return prompt, 0
    tokens = min(tokens, room)
    params = serving.relayout(params, placement)
    gen = Generator(serving, params, batch=1, max_len=len(ids) + tokens)
    out = gen.generate([ids], tokens, Sampling(), seed=seed)
    text = bytes(i for i in out.new_ids[0] if 0 <= i < 256).decode("utf-8", errors="replace")
    return prompt + text, len(out.new_ids[0])
