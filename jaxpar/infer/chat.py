"""Conversations with a loaded model: chat templates, and the turns and loop of `jaxpar chat`.

`render_chat` turns OpenAI-style messages into the prompt text, with the model's own chat template
(`chat_template` of its `tokenizer_config.json`, rendered by jinja2 as Hugging Face's
`apply_chat_template` does) or, for models without one (jaxpar's byte-token runs), `PLAIN_TEMPLATE`:
one line `role: content` per message, then `assistant:` for the reply.

In `jaxpar chat` each message is appended to the conversation, the newest part of it that leaves
room for the reply within the context is sent, and the reply (without its stop token) joins the
conversation.
"""

from __future__ import annotations

from collections.abc import Callable

from jaxpar.errors import JaxparError
from jaxpar.infer.engine import DECODE_STEPS
from jaxpar.infer.load import make_drafter
from jaxpar.infer.loaded import LoadedModel
from jaxpar.infer.sampling import Sampling
from jaxpar.infer.speculate import Speculation

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def render_chat(model: LoadedModel, messages: list[dict[str, str]]) -> str:
    """The prompt text of `messages` ({"role", "content"} each) for the assistant's reply.

    Raises:
        JaxparError: the template refuses the messages (its `raise_exception`) or is broken.
    """
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise JaxparError(f"the chat template refuses these messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(model.chat_template or PLAIN_TEMPLATE)
        return template.render(messages=messages, add_generation_prompt=True,
                               **model.special_tokens)  # fmt: skip
    except jinja2.TemplateError as e:
        raise JaxparError(f"the model's chat template fails: {e}") from None


class Chat:
    """Turns of one conversation, generated on one KV-cached generator (compiled once).

    Args:
        model: the model to talk to.
        max_new_tokens: the longest reply; the history keeps `context - max_new_tokens` tokens.
        sampling: how replies are sampled; turn i is seeded with `seed + i`.
        steps: tokens decoded per dispatch (`Generator.generate`).
        speculation: speculative decoding's drafter (`jaxpar.infer.speculate`), or None.

    Raises:
        JaxparError: `max_new_tokens` leaves no room in the context for a message.
    """

    def __init__(self, model: LoadedModel, max_new_tokens: int, sampling: Sampling, seed: int = 0,
                 steps: int = DECODE_STEPS, speculation: Speculation | None = None,
                 dtype: str = "auto"):  # fmt: skip
        model.check_fits(1, max_new_tokens)
        self.model, self.max_new_tokens, self.sampling, self.seed = (
            model, max_new_tokens, sampling, seed,
        )  # fmt: skip
        self.keep = model.context - max_new_tokens  # the newest history that fits with a reply
        self.history: list[int] = []
        self.turns = 0
        self.generator = model.generator(1, model.context)
        self.steps = steps
        self.drafter = make_drafter(speculation, model, self.generator.rows, model.context, dtype)

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

        out = self.generator.generate(
            [self.history], self.max_new_tokens, self.sampling, seed=self.seed + self.turns,
            stop_ids=model.stop_ids, on_tokens=stream, steps=self.steps, drafter=self.drafter,
        )  # fmt: skip
        reply = [i for i in out.new_ids[0] if i not in model.stop_ids]
        self.history = (self.history + reply)[-self.keep :]
        self.turns += 1
        return "".join(parts)


def chat_in_terminal(chat: Chat, prompt: str = "> ") -> None:
    """`jaxpar chat`'s loop: reads a message a line from stdin until an empty line or end of
    input, and streams each reply to stdout as it is decoded."""
    while True:
        try:
            line = input(prompt)
        except EOFError:
            break
        if not line.strip():
            break
        chat.reply(line, on_text=lambda text: print(text, end="", flush=True))
        print()
