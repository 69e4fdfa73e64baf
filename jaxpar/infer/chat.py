"""A conversation with a loaded model: the history window and the turns of `jaxpar chat`.

Each message is appended to the conversation, the newest part of it that leaves room for the reply
within the context is sent, and the reply (without its stop token) joins the conversation.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxpar.infer.engine import Sampling
from jaxpar.infer.load import LoadedModel


class Chat:
    """Turns of one conversation, generated on one KV-cached generator (compiled once).

    Args:
        model: the model to talk to.
        max_new_tokens: the longest reply; the history keeps `context - max_new_tokens` tokens.
        sampling: how replies are sampled; turn i is seeded with `seed + i`.

    Raises:
        JaxparError: `max_new_tokens` leaves no room in the context for a message.
    """

    def __init__(self, model: LoadedModel, max_new_tokens: int, sampling: Sampling, seed: int = 0):
        model.check_fits(1, max_new_tokens)
        self.model, self.max_new_tokens, self.sampling, self.seed = (
            model, max_new_tokens, sampling, seed,
        )  # fmt: skip
        self.keep = model.context - max_new_tokens  # the newest history that fits with a reply
        self.history: list[int] = []
        self.turns = 0
        self._generator = model.generator(1, model.context)

    def reply(self, message: str, on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to `message`; `on_text` receives the answer's text as it streams."""
        model = self.model
        self.history = (self.history + model.encode(message + "\n"))[-self.keep :]
        model.check_ids(self.history, "the conversation")
        show = model.stream_decoder()
        parts: list[str] = []

        def stream(step_ids: list[int | None]) -> None:
            token = step_ids[0]
            if token is not None and token not in model.stop_ids:
                parts.append(show([token]))
                if on_text is not None:
                    on_text(parts[-1])

        out = self._generator.generate(
            [self.history], self.max_new_tokens, self.sampling, seed=self.seed + self.turns,
            stop_ids=model.stop_ids, on_tokens=stream,
        )  # fmt: skip
        reply = [i for i in out.new_ids[0] if i not in model.stop_ids]
        self.history = (self.history + reply)[-self.keep :]
        self.turns += 1
        return "".join(parts)
