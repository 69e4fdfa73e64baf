"""A trained model on a mesh for inference: its parameters in the serving layout, its tokenizer
(byte tokens for jaxpar runs, `tokenizer.json` for Hugging Face models) and its context, with the
checks of ids and lengths every command and the server make. `jaxpar.infer.load` builds one.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flax import nnx

from jaxpar.config import Config
from jaxpar.errors import JaxparError
from jaxpar.infer.engine import Generator, check_context
from jaxpar.placement import Placement


@dataclass
class LoadedModel:
    """Parameters on a mesh, laid out for serving, with their tokenizer and context length.

    Attributes:
        placement: the serving placement the parameters are laid out by.
        tokenizer: a `tokenizers.Tokenizer`, or None for byte tokens.
        stop_ids: ids that end a generated sequence (the tokenizer's end-of-sequence token).
    """

    placement: Placement
    params: nnx.State
    context: int
    tokenizer: Any
    stop_ids: tuple[int, ...]
    source: str
    # The folder's chat template (`tokenizer_config.json`) and the special tokens it may name;
    # None: `jaxpar.infer.chat.PLAIN_TEMPLATE`.
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    # Why its ids cannot be read as text (`jaxpar.infer.load.no_tokenizer`); None: they can.
    unreadable: str | None = None

    @property
    def config(self) -> Config:
        return self.placement.config

    def check_text(self) -> None:
        """Refuses to turn text into ids or back when the model has no tokenizer for them."""
        if self.unreadable:
            raise JaxparError(self.unreadable)

    def encode(self, text: str) -> list[int]:
        self.check_text()
        if self.tokenizer is None:
            return list(text.encode())
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        self.check_text()
        if self.tokenizer is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids)

    def stream_decoder(self) -> Callable[..., str]:
        """A function that takes the next ids of one sequence and returns the new text they
        complete: bytes that end inside a UTF-8 character wait for the rest, until a call with
        `final=True` flushes them (as `decode` of the whole sequence would show them)."""
        self.check_text()
        if self.tokenizer is None:
            pending = codecs.getincrementaldecoder("utf-8")(errors="replace")
            return lambda ids, final=False: pending.decode(
                bytes(i for i in ids if 0 <= i < 256), final
            )
        seen: list[int] = []

        def push(ids: list[int], final: bool = False) -> str:
            before = self.decode(seen)
            seen.extend(ids)
            return self.decode(seen)[len(before) :]

        return push

    def check_ids(self, ids: list[int], what: str) -> None:
        """Refuses ids outside the vocabulary (one clear line)."""
        vocab = self.config.model.vocab
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise JaxparError(f"{what} holds id {bad[0]}, outside the vocabulary [0, {vocab})")

    def check_fits(self, prompt_len: int, new_tokens: int) -> None:
        """Refuses a prompt and a number of new tokens that together exceed the context."""
        check_context(prompt_len, new_tokens, self.context, "--max-new-tokens")

    def generator(self, batch: int, max_len: int, blocks: int = 0, block: int = 16) -> Generator:
        """A generator of this model (paged: `blocks` blocks of `block` positions)."""
        return Generator(self.placement, self.params, batch=batch, max_len=max_len,
                         blocks=blocks, block=block)  # fmt: skip
