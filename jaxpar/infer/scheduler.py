"""Continuous batching: a host scheduler over the generator's device steps.

A request runs in a decode slot (a row of every step) and keeps its keys and values in a paged
cache: one pool of blocks of `serve.block_size` positions per `data` shard, and a block table per
slot that lists the blocks holding its positions (`jaxpar.infer.blocks`). One thread runs the
loop; each turn it

1. admits waiting requests into free slots (first come, first served) while their shard's pool
   has the blocks for their prompt; a prompt that starts with cached prefix blocks takes them by
   reference and computes only the rest (a request that waited `serve.queue_timeout_s` for its
   first slot ends instead, "timeout");
2. prefills prompt pieces within the turn's budget of `serve.max_batched_tokens` (a call takes a
   `serve.prefill_chunk`-token piece of one prompt per `data` shard, or when several wait, a
   narrower piece of each of up to a shard's slots), so that a long prompt delays the
   decoding slots by a few pieces per turn, not by its whole length; a prompt's last piece draws
   its first token, and its full blocks join the prefix cache;
3. decodes every slot that has its prompt in the cache, all together, each at its own position
   with its own sampling settings (inactive slots write nothing): a block of `serve.decode_steps`
   tokens a slot in one dispatch, each fed back on the device, or a single step while a prompt
   is prefilling or a waiting request has a free slot, so that it starts after one step. The
   block ends a slot at its stop ids and `max_tokens`; stop strings are found on the host, and
   what a slot drew after its end is dropped.

Blocks are taken as positions fill, one at a time. When a shard's pool has none left, the
youngest request on that shard is preempted: its blocks are freed and it goes back to the front
of the queue, to recompute its prompt and the tokens it had drawn when it is admitted again (the
tokens already sent are kept, and the recomputed cache gives the same next tokens). A request
that finishes (a stop id or string, `max_tokens`, or a cancel) frees its slot and its blocks at
once. Every step has fixed shapes, so the steps are compiled once, before the first request. A
request's tokens depend only on its prompt and its sampling settings (its seed), never on what
else is in the batch.

Callbacks (`on_event`) run on the engine's thread; they must only hand the event over.

In a multi-process job (`jax.distributed`) process 0 runs the scheduler and every other process
`follow`s it: each device step's host inputs (a prompt piece, a decode step's rows and sampling
settings, the prefix blocks to copy) go from process 0 to the others through a `Handoff` before
process 0 runs the step, and every process runs the same steps in the same order, the one SPMD
program over all of the job's devices. The new tokens are read on process 0 only. A step that
fails there (a dead peer's collective) cannot be retried without it: the engine fails every open
request, turns `failed`, and stops.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxpar import distributed
from jaxpar.config import ServeConfig
from jaxpar.errors import JaxparError
from jaxpar.infer.blocks import BlockPool
from jaxpar.infer.engine import MIN_PROMPT_WIDTH, Generator, check_context, stop_table
from jaxpar.infer.load import make_drafter
from jaxpar.infer.loaded import LoadedModel
from jaxpar.infer.sampling import GREEDY, RowSampling, Sampling
from jaxpar.infer.speculate import Speculation, verify_round


class QueueFull(JaxparError):
    """More requests wait than `serve.max_queue` allows."""


class Closed(JaxparError):
    """The engine is shutting down and accepts no new request."""


@dataclass(frozen=True)
class Params:
    """One request's generation settings."""

    max_tokens: int
    sampling: Sampling = Sampling()
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the text (not included in it)
    stop_ids: tuple[int, ...] = ()  # token ids that end it, with the model's end-of-sequence ids
    ignore_eos: bool = False
    speculative: bool = True  # drafted and verified, where the server speculates


@dataclass(frozen=True)
class Event:
    """What a request's callback receives: new text (`finish` None), then one final event."""

    text: str
    token_ids: tuple[int, ...]
    # "stop", "length", "error" (a failed step), "timeout" (no slot within
    # `serve.queue_timeout_s`), or a cancel's reason ("cancelled", "client_closed")
    finish: str | None = None
    time: float = 0.0


@dataclass(eq=False)
class Request:
    """A request's progress; read by the caller once it has finished."""

    prompt: list[int]
    params: Params
    on_event: Callable[[Event], None]
    seed: int
    arrival: float = field(default_factory=time.perf_counter)
    slot: int = -1
    blocks: list[int] = field(default_factory=list)  # its block table: blocks of its shard's pool
    cached: int = 0  # prompt tokens found in the prefix cache
    prefilled: int = 0  # positions in the cache (`sequence` once it decodes)
    preempted: int = 0  # times its blocks were taken back
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already sent
    finish: str | None = None
    times: list[float] = field(default_factory=list)  # when each new token was on the host
    cancelled: str | None = None  # why it was cancelled (its finish), once it is
    decoder: Callable[[list[int]], str] | None = None  # the text that new ids complete

    @property
    def sequence(self) -> list[int]:
        """What the cache holds before the request decodes: its prompt, and after a preemption
        the tokens it had drawn too, but the last (the next step's input)."""
        return self.prompt + self.tokens[:-1]

    @property
    def cached_length(self) -> int:
        """len(sequence)."""
        return len(self.prompt) + max(len(self.tokens) - 1, 0)

    @property
    def decoding(self) -> bool:
        """Its cache holds `sequence`: its next step is a decode step."""
        return bool(self.tokens) and self.prefilled == self.cached_length

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.prompt) + len(self.tokens),
                "cached_tokens": self.cached}  # fmt: skip


class Engine:
    """Serves generation requests on `model`'s mesh with continuous batching.

    Args:
        model: the loaded model (its context bounds prompt + max_tokens).
        config: slots, prompt piece width, queue bound, blocks of the paged cache.
    """

    def __init__(self, model: LoadedModel, config: ServeConfig):
        spec = model.placement.spec
        unit = spec.data * spec.pipeline  # every data shard gets micro-batches for every stage
        self.model, self.config = model, config
        self.slots = -(-config.max_seqs // unit) * unit
        if config.prefill_chunk % spec.context:
            raise JaxparError(
                f"serve.prefill_chunk={config.prefill_chunk} is not a multiple of context="
                f"{spec.context}: each prompt piece's tokens are split evenly over the context axis"
            )
        self.block = block = config.block_size
        if model.context % block or block % spec.context:
            raise JaxparError(
                f"serve.block_size={block} must divide the model's context of {model.context} "
                f"tokens and be a multiple of context={spec.context} (a block's positions are "
                "split evenly over the context axis)"
            )
        per_context = model.context // block
        # Each data shard's pool; by default as many blocks as its slots hold at full context.
        blocks = config.kv_blocks or self.slots // spec.data * per_context
        if blocks < per_context:
            raise JaxparError(
                f"serve.kv_blocks={blocks} blocks of {block} positions hold fewer than one "
                f"request at the model's full context of {model.context} tokens; give at least "
                f"{per_context}"
            )
        self.generator = Generator(model.placement, model.params, batch=self.slots,
                                   max_len=model.context, blocks=blocks, block=block)  # fmt: skip
        self.chunk = min(config.prefill_chunk, model.context)
        # Speculative decoding: a drafter (None: none) whose drafts a verify pass checks.
        speculation = Speculation.parse(config.speculative, "serve.speculative")
        self.k = speculation.k if speculation else 0
        dtype = np.dtype(model.placement.dtype).name
        self.drafter = make_drafter(speculation, model, self.slots, model.context, dtype, blocks,
                                    block)  # fmt: skip
        self.drafted_tokens = self.accepted_tokens = 0
        self.pools = [BlockPool(blocks, block, config.prefix_cache) for _ in range(spec.data)]
        self._tables = np.zeros((self.slots, per_context), np.int32)  # each slot's block table
        self.preemptions = 0
        # A decode step computes the fewest rows and reads the shortest span that hold its
        # requests (`_span_groups`: short ones apart from long ones when that pays).
        self.spans, self.row_counts = self.generator.spans(), self.generator.row_counts()
        # A prefill call's (rows per shard, tokens a row): one `chunk`-token piece, or when
        # several prompts wait on a shard, a narrower piece of each of as many as the shard has
        # slots (about as many tokens a call; on one CPU device, 8 rows of 16 tokens cost 2x one
        # row of 64, 8 rows of 64 7x, most of them padding after a short prompt). Two shapes, so
        # two compilations.
        rows = self.generator.local_rows
        width = -(-max(MIN_PROMPT_WIDTH, self.chunk // rows) // spec.context) * spec.context
        self.piece_shapes = [(1, self.chunk)] + [(rows, min(width, self.chunk))] * (rows > 1)
        self.eos_ids = tuple(model.stop_ids)  # end a request unless it sets ignore_eos
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request | None] = [None] * self.slots
        self._closed = False
        self._thread: threading.Thread | None = None
        self.prefilled_tokens = 0  # prompt tokens computed (not found in the prefix cache)
        self.generated_tokens = 0
        self.decode_blocks = 0  # decode dispatches
        self._cache = self.generator.empty_cache()
        # Process 0 of a multi-process job hands each step's inputs to the others.
        multi = distributed.current().count > 1
        self.handoff = distributed.Handoff("jaxpar/serve") if multi else None
        self.failed: str | None = None  # why the engine stopped, when a step failed in lockstep
        self.on_failure: Callable[[], None] | None = None  # called once, on the engine's thread

    # -- the caller's side (any thread) ------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def active_slots(self) -> int:
        return sum(r is not None for r in self._running)

    def running(self) -> list[Request]:
        """The requests in slots now, by slot."""
        with self._lock:
            return [r for r in self._running if r is not None]

    def check(self, prompt: Sequence[int], max_tokens: int) -> None:
        """Refuses a request that cannot fit the context (one line naming the lengths)."""
        if not prompt:
            raise JaxparError("the prompt is empty; give at least one token")
        self.model.check_ids(list(prompt), "the prompt")
        check_context(len(prompt), max_tokens, self.model.context, "max_tokens")

    def submit(self, prompt: Sequence[int], params: Params,
               on_event: Callable[[Event], None]) -> Request:  # fmt: skip
        """Queues a request; `on_event` gets its text as it is generated, then its end.

        Raises:
            JaxparError: the request does not fit the context.
            QueueFull: `serve.max_queue` requests already wait.
            Closed: the engine is shutting down.
        """
        self.check(prompt, params.max_tokens)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4)) >> 1
        request = Request(list(prompt), params, on_event, seed)
        with self._lock:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are waiting (serve.max_queue = "
                    f"{self.config.max_queue}); retry later"
                )
            self._waiting.append(request)
            self._lock.notify()
        return request

    def cancel(self, request: Request, reason: str = "cancelled") -> None:
        """Stops `request`, which finishes with `reason` (its slot is freed at the start of the
        next turn)."""
        with self._lock:
            request.cancelled = request.cancelled or reason
            self._lock.notify()

    def start(self) -> Engine:
        """Compiles the steps (before any request comes) and starts the loop's thread."""
        self.warm_up()
        self._thread = threading.Thread(target=self._loop, name="jaxpar-engine", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 0.0) -> None:
        """Stops accepting requests, lets running ones finish for up to `timeout` seconds,
        cancels the rest and stops the loop."""
        deadline = time.perf_counter() + timeout
        with self._lock:
            self._closed = True
            while (self._waiting or self.active_slots) and time.perf_counter() < deadline:
                self._lock.wait(0.05)
            for request in [*self._waiting, *(r for r in self._running if r)]:
                request.cancelled = request.cancelled or "cancelled"
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        else:
            self._free_ended()
        if self.handoff is not None and not self.failed:
            self.handoff.send("stop", {})
            self.handoff = None

    def warm_up(self) -> None:
        """Compiles every step the loop runs, by running each on idle rows (which write
        nothing) of the empty cache."""
        data, k = self.generator.data, self.k

        def idle(n: int, **inputs: Any) -> dict[str, Any]:
            zeros = np.zeros(n, np.int32)
            return {"token": zeros, "position": zeros, "active": np.zeros(n, bool),
                    "table": self._tables[:n], **RowSampling.fill(n, GREEDY, 0)._asdict(),
                    **inputs}  # fmt: skip

        for (per, width), span in itertools.product(self.piece_shapes, self.spans):
            n = per * data
            self._apply("prefill", idle(n, tokens=np.zeros((n, width), np.int32), span=span,
                                        slot=np.zeros(n, np.int32), start=np.zeros(n, np.int32),
                                        length=np.ones(n, np.int32)))  # fmt: skip
        for local, span in itertools.product(self.row_counts, self.spans):
            n = local * data
            if self.drafter is None:
                self._apply("decode", idle(n, span=span, steps=self.config.decode_steps,
                                           stops=stop_table(n),
                                           limit=np.zeros(n, np.int32)))  # fmt: skip
                continue
            self._apply("verify", idle(n, span=span, room=np.zeros(n, np.int32),
                                       drafts=np.zeros((n, k), np.int32),
                                       drafted=np.zeros(n, np.int32)))  # fmt: skip
            self.drafter.warm_up(n, span, self._tables[:n])  # (steps idle rows never take)

    # -- the loop (the engine's thread) ------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._waiting or self.active_slots):
                    self._lock.wait()
                if self._closed and not (self._waiting or self.active_slots):
                    return
            try:
                self.step()
            except Exception as e:  # a failed step ends the requests it held, not the server
                traceback.print_exc()
                with self._lock:
                    for request in [*self._waiting, *(r for r in self._running if r)]:
                        self._finish(request, "error")
                    self._waiting.clear()
                    if self.handoff is not None:  # the other processes are out of step: stop
                        self.failed, self._closed = f"{type(e).__name__}: {e}", True
                if self.failed:
                    if self.on_failure is not None:
                        self.on_failure()
                    return

    def step(self) -> None:
        """One turn: admit, prefill prompt pieces, decode every ready slot.

        A turn computes about `serve.max_batched_tokens` tokens (as vLLM's chunked prefill
        budgets a step): one per decoding slot, the rest in prompt pieces, at least one piece
        per shard, so many new requests are prefilled in few turns while decoding waits at most
        one turn's pieces."""
        self._free_ended()
        self._admit()
        decoding = sum(r is not None and r.decoding for r in self._running)
        budget = self.config.max_batched_tokens - decoding
        while (tokens := self._prefill()) and (budget := budget - tokens) > 0:
            pass
        self._decode()

    def _free_ended(self) -> None:
        """Ends the requests that were cancelled, and those that waited longer than
        `serve.queue_timeout_s` for their first slot (a preempted one waits for its next)."""
        expired = time.perf_counter() - self.config.queue_timeout_s
        with self._lock:
            for request in list(self._waiting):
                if request.cancelled or (request.arrival < expired and not request.preempted):
                    self._waiting.remove(request)
                    self._finish(request, request.cancelled or "timeout")
            for request in self._running:
                if request is not None and request.cancelled:
                    self._finish(request, request.cancelled)

    def _admit(self) -> None:
        g = self.generator
        while True:
            with self._lock:
                free = [s for s, r in enumerate(self._running) if r is None]
                if not (free and self._waiting):
                    return
                request = self._waiting[0]
                # The free slot on the least busy shard: prompts on different shards prefill
                # together.
                shard_busy = [sum(r is not None for r in self._running[i : i + g.local_rows])
                              for i in range(0, self.slots, g.local_rows)]  # fmt: skip
                busy = [shard_busy[s // g.local_rows] for s in free]
                slot = free[int(np.argmin(busy))]
                pool = self.pools[slot // g.local_rows]
                sequence = request.sequence
                hits = pool.match(sequence)
                # Admitted when its shard's pool holds the rest of its prompt now (first come,
                # first served: the next request waits behind it).
                rest = -(-(len(sequence) - len(hits) * self.block) // self.block)
                if rest > pool.available - pool.claimed(hits):
                    return
                pool.take(hits, len(sequence))
                self._waiting.popleft()
                request.slot, request.blocks = slot, hits
                self._tables[slot, : len(hits)] = hits
                self._running[slot] = request
                request.prefilled = len(hits) * self.block
                if not request.tokens:
                    request.cached = request.prefilled

    def _shard(self, request: Request) -> int:
        """The `data` shard of `request`'s slot (whose pool holds its blocks)."""
        return request.slot // self.generator.local_rows

    def _grow(self, request: Request, end: int) -> bool:
        """Gives `request` the blocks for its positions below `end`, preempting the youngest
        requests of its shard while its pool has none free; False when it was preempted itself."""
        shard = self._shard(request)
        while len(request.blocks) * self.block < end:
            block = self.pools[shard].allocate()
            if block is None:
                victim = max((r for r in self._running if r is not None
                              and self._shard(r) == shard), key=lambda r: r.arrival)  # fmt: skip
                self._preempt(victim)
                if victim is request:
                    return False
                continue
            self._tables[request.slot, len(request.blocks)] = block
            request.blocks.append(block)
        return True

    def _preempt(self, request: Request) -> None:
        """Frees `request`'s blocks and slot; it waits first in line to compute them again."""
        with self._lock:
            self._release(request)
            self._running[request.slot] = None
            request.slot, request.prefilled = -1, 0
            request.preempted += 1
            self.preemptions += 1
            self._waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        if request.blocks:
            self.pools[self._shard(request)].release(request.blocks)
            request.blocks = []

    def _prefill(self) -> int:
        """Prompt pieces in one call: one `chunk`-token piece per shard of its oldest request
        still prefilling, or when several wait on a shard, a narrower piece of each of its
        oldest `piece_shapes[-1][0]`; returns the tokens the call computes (0: no prompt
        waits)."""
        g, data = self.generator, self.generator.data
        waiting: list[list[Request]] = [[] for _ in range(data)]
        for request in self._running:
            if request is not None and request.prefilled < request.cached_length:
                waiting[self._shard(request)].append(request)
        if not any(waiting):
            return 0
        per, width = self.piece_shapes[-1 if max(map(len, waiting)) > 1 else 0]
        picked: list[list[Request]] = [[] for _ in range(data)]
        for shard, requests in enumerate(waiting):
            for request in sorted(requests, key=lambda r: r.arrival)[:per]:
                end = min(request.prefilled + width, request.cached_length)
                # (a request preempted by an older one's growth has no slot any more)
                if request.slot >= 0 and self._grow(request, end):
                    picked[shard].append(request)
        picked = [[r for r in requests if r.slot >= 0] for requests in picked]
        if not any(picked):
            return width
        rows: list[Request | None] = [None] * (data * per)
        for shard, requests in enumerate(picked):
            rows[shard * per : shard * per + len(requests)] = requests
        tokens = np.zeros((len(rows), width), np.int32)
        slot, start, length = (np.zeros(len(rows), np.int32) for _ in range(3))
        length += 1
        active = np.zeros(len(rows), bool)
        table = np.zeros((len(rows), self._tables.shape[1]), np.int32)
        for i, request in enumerate(rows):
            if request is not None:
                piece = request.sequence[request.prefilled : request.prefilled + width]
                tokens[i, : len(piece)] = piece
                slot[i], start[i] = request.slot % g.local_rows, request.prefilled
                length[i] = len(piece)
                active[i], table[i] = True, self._tables[request.slot]
        span = g.span_for(int((start + length).max()))  # (the positions the pieces read)
        token = np.asarray(self._device("prefill", tokens=tokens, slot=slot, start=start,
                                        length=length, active=active, table=table, span=span,
                                        **self._sampling(rows)._asdict()))  # fmt: skip
        for i, request in enumerate(rows):
            if request is None:
                continue
            request.prefilled += int(length[i])
            self.prefilled_tokens += int(length[i])
            if request.prefilled == request.cached_length:
                pool = self.pools[self._shard(request)]
                pool.publish(request.prompt, request.blocks)
                if not request.tokens:  # (a resumed request has drawn this token already)
                    self._accept(request, int(token[i]))
        return per * width

    def _decode(self) -> None:
        """A block of decode steps for every ready slot: `serve.decode_steps` tokens a row on
        the device, or one while a prompt is prefilling or a request could be admitted (so that
        it waits for at most one step)."""
        def ready() -> list[Request | None]:
            return [r if r is not None and r.decoding and r.finish is None else None
                    for r in self._running]  # fmt: skip

        admissible = self._waiting and not all(self._running)
        prefilling = any(r is not None and not r.decoding for r in self._running)
        steps = 1 if admissible or prefilling else self.config.decode_steps
        if self.drafter is not None:  # a verify pass instead: its last token and k drafts
            steps = self.k + 1
        # Each the blocks for the positions it writes, the oldest first (so the youngest yield).
        for request in sorted(filter(None, ready()), key=lambda r: r.arrival):
            if request.slot >= 0:
                self._grow(request, request.cached_length + self._limit(request, steps))
        ready = [r for r in ready() if r is not None]
        if ready:
            for group in self._span_groups(ready, steps):
                if self.drafter is None:
                    self._decode_rows(group, steps)
                else:
                    self._verify_rows(group)

    def _limit(self, request: Request, steps: int) -> int:
        """The tokens `request` draws in a block of `steps` (at most, in a verify pass of
        `steps` - 1 drafts; one if it does not speculate)."""
        if self.drafter is not None and not request.params.speculative:
            steps = 1
        return min(steps, request.params.max_tokens - len(request.tokens))

    def _span_groups(self, ready: list[Request], steps: int) -> list[list[Request]]:
        """The ready requests in one decode block, or in two when that reads at most half as
        many cache positions: the shorter ones over a shorter span (a step reads every row's
        cache up to its span, whatever each row holds)."""
        g = self.generator
        need = {id(r): g.span_for(r.cached_length + self._limit(r, steps)) for r in ready}

        def cost(group: list[Request]) -> int:
            if not group:
                return 0
            shards = np.bincount([self._shard(r) for r in group], minlength=g.data)
            rows = next(n for n in self.row_counts if n >= shards.max())
            return rows * max(need[id(r)] for r in group)

        best, groups = cost(ready), [ready]
        for span in sorted(set(need.values()))[:-1]:
            short = [r for r in ready if need[id(r)] <= span]
            long = [r for r in ready if need[id(r)] > span]
            if 2 * (cost(short) + cost(long)) <= best:
                best, groups = cost(short) + cost(long), [short, long]
        return groups

    def _decode_rows(self, requests: list[Request], steps: int) -> None:
        """One decode block of `requests` (`_rows_of`), of up to `steps` tokens a row. A
        request's tokens after its end (a stop the device did not know, a stop string) are
        dropped."""
        g = self.generator
        rows = self._rows_of(requests)
        token, position, limit = (np.zeros(len(rows), np.int32) for _ in range(3))
        table = np.zeros((len(rows), self._tables.shape[1]), np.int32)
        stops: list[tuple[int, ...]] = [()] * len(rows)
        active = np.array([r is not None for r in rows])
        for i, request in enumerate(rows):
            if request is not None:
                token[i] = request.tokens[-1]
                position[i] = request.cached_length
                limit[i] = self._limit(request, steps)
                table[i] = self._tables[request.slot]
                p = request.params
                stops[i] = (*(() if p.ignore_eos else self.eos_ids), *p.stop_ids)
        span = g.span_for(int((position + limit).max()))
        # (one program for every block: a shorter one is the same with smaller limits)
        new = self._device("decode", token=token, position=position, active=active, span=span,
                           table=table, steps=self.config.decode_steps, limit=limit,
                           stops=stop_table(len(rows), stops),
                           **self._sampling(rows)._asdict())  # fmt: skip
        self.decode_blocks += 1
        self._take(rows, np.asarray(new))

    def _verify_rows(self, requests: list[Request]) -> None:
        """One speculative round of `requests` (laid out as `_decode_rows` lays them out): up
        to k drafts a row, n-gram lookups from here or the draft model's on the device, checked
        in one target pass (`Generator.verify`)."""
        g, k = self.generator, self.k
        rows = self._rows_of(requests)
        token, position, room, drafted = (np.zeros(len(rows), np.int32) for _ in range(4))
        drafts = np.zeros((len(rows), k), np.int32)
        table = np.zeros((len(rows), self._tables.shape[1]), np.int32)
        for i, request in enumerate(rows):
            if request is not None:
                token[i], position[i] = request.tokens[-1], request.cached_length
                room[i] = self._limit(request, k + 1) - 1
                table[i] = self._tables[request.slot]
        sampling = self._sampling(rows)
        if not self.drafter.on_device:  # (drafted here, handed to every process)
            sequences = [r.prompt + r.tokens if r is not None else [] for r in rows]
            drafts, drafted, _ = self.drafter.draft(sequences, token, position, sampling, room)
        span = g.span_for(int((position + room).max()) + 1)
        active = np.array([r is not None for r in rows])
        new, drafted, kept = self._device("verify", token=token, position=position,
                                          active=active, room=room, drafts=drafts,
                                          drafted=drafted, table=table, span=span,
                                          **sampling._asdict())  # fmt: skip
        self.decode_blocks += 1
        self.drafted_tokens += int(drafted.sum())
        self.accepted_tokens += int(kept.clip(0).sum())
        self._take(rows, new)

    def _rows_of(self, requests: list[Request]) -> list[Request | None]:
        """A step's rows: each shard's requests in its first rows (a paged row is any request of
        the shard: its block table says where its cache is), the rest idle; as few rows a shard
        as `row_counts` allows."""
        g = self.generator
        shard_of = [self._shard(r) for r in requests]
        local = next(n for n in self.row_counts if n >= max(np.bincount(shard_of)))
        rows: list[Request | None] = [None] * (g.data * local)
        taken = [0] * g.data
        for request, shard in zip(requests, shard_of, strict=True):
            rows[shard * local + taken[shard]] = request
            taken[shard] += 1
        return rows

    def _take(self, rows: list[Request | None], new_BK: np.ndarray) -> None:
        """Each row's new tokens, in order, up to its first -1 or its end."""
        for i, request in enumerate(rows):
            for tok in new_BK[i] if request is not None else ():
                if tok < 0 or request.finish is not None:
                    break
                request.prefilled += 1  # its input token is in the cache now
                self._accept(request, int(tok))

    def _device(self, step: str, **inputs: Any) -> Any:
        """Runs device step `step` on the engine's cache with host `inputs` (numpy arrays and
        numbers); in a multi-process job it first hands them to the other processes, which run
        the same step (`follow`). Returns the step's new tokens ((B, steps) for a decode block),
        and for a verify pass also each row's drafts and kept drafts (`verify_round`)."""
        if self.handoff is not None:
            self.handoff.send(step, inputs)
        return self._apply(step, inputs)

    def _apply(self, step: str, x: dict[str, Any]) -> Any:
        g = self.generator
        rows = RowSampling(*(x[k] for k in RowSampling._fields))
        span = int(x["span"])
        if step == "prefill":
            args = (x["tokens"], x["slot"], x["start"], x["length"], x["active"], rows,
                    x["table"], span)  # fmt: skip
            self._cache, _, token = g.prefill_chunk(self._cache, *args)
            if self.drafter is not None:
                self.drafter.prefill_chunk(*args)
            return token
        if step == "decode":
            self._cache, _, tokens = g.decode(self._cache, x["token"], x["position"], rows,
                                              x["active"], span, x["table"], int(x["steps"]),
                                              x["limit"], x["stops"])  # fmt: skip
            return tokens
        assert step == "verify", step
        self._cache, block, drafted, kept = verify_round(
            g, self.drafter, self._cache, x["token"], x["position"], rows, x["active"],
            x["room"], span, x["table"], x["drafts"], x["drafted"],
        )  # fmt: skip
        return block, drafted, kept

    def follow(self) -> None:
        """Runs a process other than 0 of a multi-process job: the steps that process 0 hands
        over, in its order, until it says stop (on SIGTERM, once it has not done so within
        `serve.shutdown_s` + a minute)."""
        import signal

        give_up: list[float] = []
        signal.signal(signal.SIGTERM, lambda *_: give_up.append(
            time.monotonic() + self.config.shutdown_s + 60))  # fmt: skip
        self.warm_up()
        while True:
            step, inputs = self.handoff.receive(give_up=give_up[0] if give_up else None)
            if step == "stop":
                return
            self._apply(step, inputs)

    def _sampling(self, requests: Sequence[Request | None]) -> RowSampling:
        n = len(requests)
        rows = RowSampling.fill(n, GREEDY, 0)
        for i, r in enumerate(requests):
            if r is not None:
                rows.put(i, r.params.sampling, r.seed, len(r.tokens))
        return rows

    # -- a request's tokens ------------------------------------------------------------------

    def _accept(self, request: Request, token: int) -> None:
        """A new token of `request`: its text, and whether the request ends here."""
        now = time.perf_counter()
        if request.decoder is None:
            request.decoder = self.model.stream_decoder()
        request.tokens.append(token)
        request.times.append(now)
        self.generated_tokens += 1
        p = request.params
        stop_token = token in p.stop_ids or (token in self.eos_ids and not p.ignore_eos)
        last = stop_token or len(request.tokens) >= p.max_tokens
        request.text += request.decoder([] if stop_token else [token], final=last)
        finish = "stop" if stop_token else "length" if last else None
        cut = _find_stop(request.text, p.stop, request.sent)
        if cut is not None:
            request.text, finish = request.text[:cut], "stop"
        # Text that may be the start of a stop string waits until it is known not to be.
        hold = 0 if finish else max((len(s) - 1 for s in p.stop), default=0)
        end = max(request.sent, len(request.text) - hold)
        if end > request.sent:
            request.on_event(Event(request.text[request.sent : end], (token,), None, now))
            request.sent = end
        if finish:
            with self._lock:
                self._finish(request, finish)

    def _finish(self, request: Request, reason: str) -> None:
        """Ends `request` (with the lock held) and frees its slot."""
        if request.finish is not None:
            return
        request.finish = reason
        if request.slot >= 0 and self._running[request.slot] is request:
            self._release(request)
            self._running[request.slot] = None
        request.on_event(Event("", (), reason, time.perf_counter()))
        self._lock.notify_all()


def _find_stop(text: str, stops: Sequence[str], sent: int) -> int | None:
    """Where the first stop string in `text` begins (None: none), looking only where one could
    start after the text already sent."""
    found = [i for s in stops if s and (i := text.find(s, max(0, sent - len(s) + 1))) >= 0]
    return min(found) if found else None
