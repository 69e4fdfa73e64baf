"""`jaxpar serve`: continuous batching against one request at a time and against `generate`, the
prefix cache, and the OpenAI HTTP API (the official client, streaming, errors, load and faults)
on a live server bound to 127.0.0.1."""

import concurrent.futures
import contextlib
import dataclasses
import datetime
import http.client
import io
import ipaddress
import json
import logging
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import typing

import httpx
import jax
import numpy as np
import openai
import pytest

from jaxpar.cli import main
from jaxpar.config import ServeConfig
from jaxpar.errors import JaxparError
from jaxpar.infer.access import KEY_ENV, Access, check_tls, exposure_warning, read_access
from jaxpar.infer.chat import PLAIN_TEMPLATE, render_chat
from jaxpar.infer.load import load_run
from jaxpar.infer.protocol import ChatRequest, CompletionRequest
from jaxpar.infer.sampling import GREEDY, Sampling
from jaxpar.infer.scheduler import Engine, Params
from jaxpar.infer.server import bind, create_app, max_body_bytes, uvicorn_server
from jaxpar.mesh import make_mesh, parse_mesh

SIZES = ["model.layers=2", "model.dim=32", "model.heads=4", "model.kv_heads=2",
         "model.mlp_dim=64"]  # fmt: skip
CONTEXT = 256
# A pool of 32 blocks of 8 positions per data shard: one full context for 4 slots, so that 16
# requests of up to 94 tokens (12 blocks) preempt each other.
SERVE = ServeConfig(max_seqs=4, prefill_chunk=32, max_queue=16, block_size=8, kv_blocks=32)
WAIT_S = 60  # the bound on every wait below


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "tiny"
    text = out.parent / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nimport os\nprint('hello')\n" * 40)
    argv = ["train", "--out", str(out), "--mesh", "data=4,tensor=2", *SIZES, "train.batch_size=4",
            f"train.seq_len={CONTEXT}", "train.steps=30", "train.sample_tokens=0",
            "train.warmup_steps=1", f"data.path={text}"]  # fmt: skip
    assert main(argv) == 0
    return out


def loaded(run, spec: str):
    s = parse_mesh(spec)
    return load_run(run, make_mesh(s, jax.devices()[: s.size]), "float32")


@pytest.fixture(scope="module")
def engine(run):
    engine = Engine(loaded(run, "data=1"), SERVE).start()
    yield engine
    engine.close()


class LiveServer:
    """`create_app` under uvicorn on a thread, on a free port of 127.0.0.1, as `jaxpar serve`
    runs it (with TLS when `config` names its files; by default the engine's settings)."""

    def __init__(self, engine: Engine, name: str, access: Access | None = None,
                 config: ServeConfig | None = None):  # fmt: skip
        config = config or engine.config
        sock = bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        scheme = "https" if config.ssl_certfile else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.server = uvicorn_server(create_app(engine, name, access), config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]})
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)


@pytest.fixture(scope="module")
def server(engine):
    live = LiveServer(engine, "tiny")
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def submit_and_wait(engine: Engine, jobs: list[tuple[list[int], Params]]):
    """Submits every job at once; returns the finished requests in order."""
    done = [threading.Event() for _ in jobs]
    requests = [
        engine.submit(prompt, params, lambda e, d=d: e.finish and d.set())
        for (prompt, params), d in zip(jobs, done, strict=True)
    ]
    for d in done:
        assert d.wait(WAIT_S)
    return requests


# --- the engine -------------------------------------------------------------------------------


def jobs(n: int, seed: int = 0, heavy: int = 4) -> list[tuple[list[int], Params]]:
    """n greedy requests: of 1-69 prompt tokens and 1-23 new ones, then `heavy` of 60 and 28 (11
    blocks of 8 each: any three at once outgrow the pool's 32 blocks, and preempt)."""
    rng = np.random.default_rng(seed)
    work = [
        (rng.integers(0, 256, int(rng.integers(1, 70))).tolist(),
         Params(max_tokens=int(rng.integers(1, 24)), sampling=GREEDY))
        for _ in range(n - heavy)
    ]  # fmt: skip
    return work + [(rng.integers(0, 256, 60).tolist(), Params(28, sampling=GREEDY))
                   for _ in range(heavy)]  # fmt: skip


@pytest.fixture(scope="module")
def alone(engine) -> list:
    """`jobs(16)` one at a time on one device."""
    return [submit_and_wait(engine, [job])[0] for job in jobs(16)]


@pytest.mark.parametrize("spec", ["data=1", "data=2,pipeline=2,tensor=2"])
def test_concurrent_requests_get_the_tokens_they_get_alone(run, engine, alone, spec):
    # 16 greedy requests of different lengths over 4 slots (prompts up to 70 tokens: several
    # 32-token pieces each), against each alone (on one device) and against the static batch of
    # `generate`; on the 3-D mesh, with n-gram speculation (each slot's drafts checked in one
    # target pass).
    ngram = dataclasses.replace(SERVE, speculative="ngram:3")
    mesh_engine = engine if spec == "data=1" else Engine(loaded(run, spec), ngram).start()
    work = jobs(16)
    together = [r.tokens for r in submit_and_wait(mesh_engine, work)]
    assert together == [r.tokens for r in alone]
    if mesh_engine is not engine:
        assert 0 < mesh_engine.accepted_tokens <= mesh_engine.drafted_tokens
    assert [len(t) for t in together] == [p.max_tokens for _, p in work]
    if spec == "data=1":  # (on data=2, a shard's 2 slots fit its 32 blocks)
        assert mesh_engine.preemptions > 0
    for pool in mesh_engine.pools:  # every block free again (or cached), none lost
        pool.check()
        assert pool.used == 0 and pool.available == pool.blocks
    generator = engine.model.generator(1, CONTEXT)
    static = [generator.generate([prompt], p.max_tokens, GREEDY).new_ids[0]
              for prompt, p in work[:4]]  # fmt: skip
    assert static == together[:4]
    if mesh_engine is not engine:
        assert mesh_engine.generator.microbatches == 2  # the slots run as micro-batches
        mesh_engine.close()


def test_prefix_cache_prefills_only_the_new_tokens(engine):
    rng = np.random.default_rng(7)
    shared = rng.integers(0, 256, 200).tolist()  # 25 blocks of 8
    first, second = shared + [1, 2, 3, 4, 5], shared + [9, 8, 7, 6, 5, 4, 3]
    submit_and_wait(engine, [(first, Params(4, sampling=GREEDY))])
    (pool,) = engine.pools
    before, hits = engine.prefilled_tokens, pool.hit_tokens
    (request,) = submit_and_wait(engine, [(second, Params(12, sampling=GREEDY))])
    assert engine.prefilled_tokens - before == 7  # only the tokens after the shared 200
    assert pool.hit_tokens - hits == 200 and request.usage["cached_tokens"] == 200
    without = engine.model.generator(1, CONTEXT).generate([second], 12, GREEDY).new_ids[0]
    assert request.tokens == without
    # Three requests at once hold one copy of the prefix's 25 blocks, each its own blocks after
    # (3 x 28 blocks at the end: unshared, they would not fit the pool's 32).
    work = [(shared + [i], Params(24, sampling=GREEDY)) for i in range(3)]
    done = threading.Event()
    thread = threading.Thread(target=lambda: (submit_and_wait(engine, work), done.set()))
    thread.start()
    together: list[list[int]] = []
    while not done.is_set():
        tables = [list(r.blocks) for r in engine.running()]
        if len(tables) == 3 and sum(map(len, tables)) > sum(map(len, together)):
            together = tables
    thread.join(WAIT_S)
    assert sum(map(len, together)) > engine.pools[0].blocks
    assert len({tuple(t[:25]) for t in together}) == 1
    assert len({b for t in together for b in t}) == 25 + sum(len(t) - 25 for t in together)
    assert engine.pools[0].used == 0


def test_stop_ids_eos_stop_strings_and_max_tokens(engine):
    prompt = list(b"def add(a, b):\n")
    (free,) = submit_and_wait(engine, [(prompt, Params(20, sampling=GREEDY))])
    tokens, text = free.tokens, free.text
    assert free.finish == "length" and len(tokens) == 20
    k = 6
    (by_id,) = submit_and_wait(engine, [(prompt, Params(20, sampling=GREEDY,
                                                         stop_ids=(tokens[k],)))])  # fmt: skip
    first = tokens.index(tokens[k])
    assert by_id.finish == "stop" and by_id.tokens == tokens[: first + 1]
    eos, engine.eos_ids = engine.eos_ids, (tokens[k],)  # the model's end-of-sequence id
    try:
        (by_eos,) = submit_and_wait(engine, [(prompt, Params(20, sampling=GREEDY))])
        (ignoring,) = submit_and_wait(engine, [(prompt, Params(20, sampling=GREEDY,
                                                               ignore_eos=True))])  # fmt: skip
    finally:
        engine.eos_ids = eos
    assert by_eos.tokens == tokens[: first + 1] and ignoring.tokens == tokens
    stop = text[8:10]
    (by_text,) = submit_and_wait(engine, [(prompt, Params(20, sampling=GREEDY, stop=(stop,)))])
    assert by_text.finish == "stop" and by_text.text == text[: text.index(stop)]
    (short,) = submit_and_wait(engine, [(prompt, Params(3, sampling=GREEDY))])
    assert short.tokens == tokens[:3] and short.usage["completion_tokens"] == 3


def test_sampled_requests_follow_their_seed(engine):
    prompt = list(b"import ")
    params = Params(16, Sampling(1.0, top_k=20), seed=11)
    a, b, other = submit_and_wait(
        engine, [(prompt, params), (prompt, params), (prompt, Params(16, Sampling(1.0), seed=12))]
    )
    assert a.tokens == b.tokens != other.tokens


def test_a_request_starts_within_one_block_of_the_others(engine):
    # A lone request decodes `serve.decode_steps` tokens a dispatch; one that comes meanwhile
    # gets its first token before the first has drawn more than one block more.
    steps, blocks = engine.config.decode_steps, engine.decode_blocks
    (lone,) = submit_and_wait(engine, [(list(b"def add(a, b):\n"), Params(40, sampling=GREEDY))])
    assert engine.decode_blocks - blocks <= 40 // steps + 1
    first = engine.submit(list(b"import os\n"), Params(160, sampling=GREEDY), lambda e: None)
    wait_for(lambda: len(first.tokens) >= 2 * steps, "the first request's blocks")
    (second,) = submit_and_wait(engine, [(list(b"print("), Params(2, sampling=GREEDY))])
    submitted = second.arrival
    drawn = sum(submitted < t < second.times[0] for t in first.times)
    assert drawn <= steps
    wait_for(lambda: first.finish is not None, "the first request")
    alone = engine.model.generator(1, CONTEXT).generate([list(b"import os\n")], 160, GREEDY)
    assert first.tokens == alone.new_ids[0]


def test_a_draft_model_serves_the_tokens_of_plain_decoding(run, alone):
    # Continuous batching with preemption and the prefix cache, each request's drafts from a
    # draft model (the run itself: every draft kept) whose paged cache mirrors the target's.
    config = dataclasses.replace(SERVE, speculative=f"draft:{run}:3")
    engine = Engine(loaded(run, "data=1"), config).start()
    try:
        together = submit_and_wait(engine, jobs(16))
        assert [r.tokens for r in together] == [r.tokens for r in alone]
        assert 0 < engine.accepted_tokens == engine.drafted_tokens
        blocks = engine.decode_blocks
        prompt, params = list(b"import "), Params(16, Sampling(1.0, top_k=20), seed=11)
        a, b = submit_and_wait(engine, [(prompt, params), (prompt, params)])
        opted_out = dataclasses.replace(params, speculative=False)
        drafted = engine.drafted_tokens
        (c,) = submit_and_wait(engine, [(prompt, opted_out)])
        assert a.tokens == b.tokens and len(c.tokens) == 16
        assert engine.drafted_tokens == drafted and engine.decode_blocks - blocks > 16
    finally:
        engine.close()


# --- chat templates ---------------------------------------------------------------------------


def test_chat_templates(engine):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert render_chat(engine.model, messages) == "system: be brief\nuser: hi\nassistant:"
    assert "assistant" in PLAIN_TEMPLATE
    hf_style = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    model = engine.model
    try:
        model.chat_template, model.special_tokens = (
            hf_style,
            {"bos_token": "<s>", "eos_token": "</s>"},
        )
        assert render_chat(model, messages[1:]) == "<s><|user|>\nhi</s>\n<|assistant|>\n"
    finally:
        model.chat_template, model.special_tokens = None, {}


def test_chat_template_from_tokenizer_config():
    from jaxpar.infer.load import read_chat_template

    config = {"chat_template": [{"name": "tool_use", "template": "T"},
                                {"name": "default", "template": "D"}],
              "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
              "model_max_length": 4096}  # fmt: skip
    assert read_chat_template(config) == ("D", {"bos_token": "<s>", "eos_token": "</s>"})
    assert read_chat_template({}) == (None, {})


# --- the HTTP API -----------------------------------------------------------------------------

PROMPTS = ["def add(a, b):\n", "import os\n", "p"]
CHAT = [{"role": "user", "content": "print hello"}]


@pytest.fixture(scope="module")
def generated(run, engine):
    """`jaxpar generate --greedy` of the completion prompts and of the chat's rendered prompt."""
    prompts = [*PROMPTS, render_chat(engine.model, CHAT)]
    argv = ["generate", "--run", str(run), "--mesh", "data=8", "--greedy", "--max-new-tokens",
            "24", "--json"]  # fmt: skip
    argv += [arg for p in prompts for arg in ("--prompt", p)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return json.loads(out.getvalue())["text"]


def test_openai_client_gets_the_greedy_text_of_generate(client, generated):
    for prompt, expected in zip(PROMPTS, generated, strict=False):
        done = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                         temperature=0)  # fmt: skip
        assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
        assert done.usage.completion_tokens == 24 and done.usage.prompt_tokens == len(prompt)
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True})  # fmt: skip
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert chunks[-1].usage.completion_tokens == 24
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24,
                                          temperature=0)  # fmt: skip
    assert chat.choices[0].message.content == generated[-1]
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24,
                                            temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream) == generated[-1]
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_a_cache_split_over_context_serves_what_one_device_serves(run, engine):
    # context=2: every slot's positions striped over two devices, prompts prefilled as pieces
    # split over them (32-token pieces, and prompts up to 70 tokens: several each), the prefix
    # pool striped likewise.
    split = Engine(loaded(run, "context=2"), SERVE).start()
    try:
        g = split.generator
        assert g.device_tokens == SERVE.kv_blocks * SERVE.block_size // 2
        assert f"each device holds {g.device_tokens} tokens" in g.cache_summary()
        work = jobs(6, seed=3, heavy=0)
        assert ([r.tokens for r in submit_and_wait(split, work)]
                == [r.tokens for r in submit_and_wait(engine, work)])  # fmt: skip
        shared = np.random.default_rng(8).integers(0, 256, 200).tolist()
        second = shared + [9, 8, 7, 6, 5, 4, 3]
        submit_and_wait(split, [(shared + [1, 2, 3], Params(2, sampling=GREEDY))])
        before = split.prefilled_tokens
        (hit,) = submit_and_wait(split, [(second, Params(12, sampling=GREEDY))])
        assert split.prefilled_tokens - before == 7 and hit.usage["cached_tokens"] == 200
        (alone,) = submit_and_wait(engine, [(second, Params(12, sampling=GREEDY))])
        assert hit.tokens == alone.tokens
    finally:
        split.close()


def test_stop_strings_and_usage_over_http(server, generated):
    text = generated[0]
    stop = text[10:12]
    body = {"prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "stop": [stop]}
    out = httpx.post(server.url + "/v1/completions", json=body, timeout=WAIT_S).json()
    assert out["choices"][0]["text"] == text[: text.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"
    lines = []
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                      timeout=WAIT_S) as r:  # fmt: skip
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[: text.index(stop)]
    u = out["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def _open_streams(server, n: int):
    """n streaming requests that would run long, each read up to its first event."""
    streams = []
    for _ in range(n):
        body = {"prompt": "x", "max_tokens": CONTEXT - 1, "stream": True, "ignore_eos": True}
        cm = httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=WAIT_S)
        response = cm.__enter__()
        assert response.status_code == 200
        lines = response.iter_lines()  # (kept: dropping it would close the stream)
        next(lines)
        streams.append((cm, lines))
    return streams


def slow_decoding(engine, monkeypatch, seconds: float = 0.02) -> None:
    """Engine turns this much slower, one token a turn: a long request then runs for seconds,
    not milliseconds."""
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(seconds), step()))
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, decode_steps=1))


def test_a_client_that_goes_away_frees_its_slot(server, engine, monkeypatch):
    slow_decoding(engine, monkeypatch)  # a request of 255 tokens runs for over 5 s
    streams = _open_streams(server, engine.slots)  # every slot busy
    running = engine.running()
    assert len(running) == engine.slots
    for cm, _ in streams:
        cm.__exit__(None, None, None)  # the client goes away mid-stream
    wait_for(lambda: engine.active_slots == 0, "the slots to be freed")
    # freed by the cancellation, not by running out of tokens
    assert [r.finish for r in running] == ["cancelled"] * engine.slots
    assert all(len(r.tokens) < CONTEXT - 1 for r in running)
    # A client that waits for a whole answer and goes away frees its slot too.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": "x", "max_tokens": CONTEXT - 1, "ignore_eos": True}))  # fmt: skip
    wait_for(lambda: engine.active_slots == 1, "the request to start")
    (left,) = engine.running()
    conn.close()
    wait_for(lambda: engine.active_slots == 0, "its slot to be freed")
    assert left.finish == "client_closed" and len(left.tokens) < CONTEXT - 1
    out = httpx.post(server.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 2},
                     timeout=WAIT_S)  # fmt: skip
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 2


def test_a_full_queue_gives_429_and_a_long_wait_503(server, engine, monkeypatch):
    monkeypatch.setattr(engine, "config", dataclasses.replace(SERVE, max_queue=2))
    slow_decoding(engine, monkeypatch)
    streams = _open_streams(server, engine.slots)
    waiting = []

    def wait_in_queue(stream: bool):
        body = {"prompt": "q", "max_tokens": 2, "stream": stream}
        waiting.append(httpx.post(server.url + "/v1/completions", json=body, timeout=WAIT_S))

    threads = [threading.Thread(target=wait_in_queue, args=(s,)) for s in (False, True)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: engine.queue_length == engine.config.max_queue, "the queue to fill")
        full = httpx.post(server.url + "/v1/completions", json={"prompt": "q"}, timeout=WAIT_S)
        assert full.status_code == 429
        assert full.json()["error"]["type"] == "rate_limit_error"
        assert "serve.max_queue = 2" in full.json()["error"]["message"]
        # The two waiting (one streamed) have waited long enough: 503, and no stream begun.
        monkeypatch.setattr(engine, "config",
                            dataclasses.replace(engine.config, queue_timeout_s=0.01))  # fmt: skip
        for t in threads:
            t.join(WAIT_S)
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
    assert [r.status_code for r in waiting] == [503, 503]
    assert [r.json()["error"]["code"] for r in waiting] == ["queue_timeout"] * 2
    assert "serve.queue_timeout_s = 0.01 s" in waiting[0].json()["error"]["message"]
    metrics = httpx.get(server.url + "/metrics", timeout=WAIT_S).text
    assert 'jaxpar_requests_total{endpoint="completions",status="429"} 1.0' in metrics


BAD = [
    ("/v1/completions", "{not json", 400, "not valid JSON"),
    ("/v1/completions", "[1, 2]", 400, "must be a JSON object"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400,
     "'max_tokens' must be an integer of at least 1, got -1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "must be an integer"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "must be a number"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400,
     "'temperature' must be a number in [0, 2], got 3"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "'top_p' must be a number in (0, 1]"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "'stream' must be true or false"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "'n' must be 1 (jaxpar returns one"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, "'stop' must be"),
    ("/v1/completions", {"prompt": ""}, 400, "'prompt' is empty"),
    ("/v1/completions", {"prompt": 5}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": [300]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x" * 250, "max_tokens": 10}, 400,
     "prompt of 250 tokens + max_tokens 10 exceeds the model's context of 256"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "the model 'gpt-4' does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "'messages' must be a non-empty array"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400,
     "'messages[0].role' is required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400,
     "'messages[0].content' must be a string or an array"),
    ("/v1/nothing", {}, 404, "Not Found"),
]  # fmt: skip


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    for path, body, status, fragment in BAD:
        content = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(server.url + path, content=content, timeout=WAIT_S)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert fragment in error["message"], (body, error)
        assert set(error) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/v1/models/gpt-4", timeout=WAIT_S).status_code == 404
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                    timeout=WAIT_S)  # fmt: skip
    assert ok.status_code == 200
    assert httpx.get(server.url + "/health", timeout=WAIT_S).json()["status"] == "ok"


def _hostile() -> list[tuple[str, bytes, int, str]]:
    """(path, body, status, fragment of the message) for bodies a client could send to hurt the
    server: every field of both endpoints of a wrong type, every float NaN or infinite, and
    bodies that are deep, invalid, huge or shaped to overflow the engine."""
    limit = max_body_bytes(SERVE, CONTEXT)
    table = [
        ("/v1/chat/completions", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400,
         "not valid JSON (recursion limit exceeded"),
        ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "not valid JSON"),
        ("/v1/completions", b'{"prompt": "x", "stop": [' + b'"a",' * 100_000 + b'"a"]}', 400,
         "'stop' must be a string or an array of at most 4 strings"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "'messages' must be a non-empty"),
        ("/v1/completions", b'{"prompt": "' + b"a" * limit + b'"}', 413,
         f"exceeds serve.max_body_bytes = {limit:,}"),
        ("/v1/completions", b'{"prompt": "x", "seed": ' + b"9" * 30 + b"}", 400,
         "'seed' must be a 64-bit integer"),
        ("/v1/completions", b'{"prompt": [' + b"9" * 30 + b"]}", 400, "an array of token ids"),
        ("/v1/completions", b'{"prompt": "x", "stop_token_ids": [300]}', 400, "ids in [0, 256)"),
    ]  # fmt: skip
    for path, kind, base in (("/v1/completions", CompletionRequest, {"prompt": "x"}),
                             ("/v1/chat/completions", ChatRequest, CHAT_BODY)):  # fmt: skip
        for name, info in kind.model_fields.items():
            body = json.dumps({**base, name: [{}]}).encode()
            table.append((path, body, 400, f"'{name}"))
            if float in typing.get_args(info.annotation):
                for bad in ("NaN", "Infinity", "-Infinity"):
                    body = json.dumps(base).encode()[:-1] + f', "{name}": {bad}}}'.encode()
                    table.append((path, body, 400, f"'{name}' must be "))
    return table


CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def server_log(monkeypatch) -> list[str]:
    """What the server logs while a test runs: uvicorn's records, and the tracebacks the app
    prints for its own failures."""
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("uvicorn").addHandler(handler)
    monkeypatch.setattr(traceback, "print_exc", lambda *a, **k: logged.append("a traceback"))
    yield logged
    logging.getLogger("uvicorn").removeHandler(handler)


def test_hostile_bodies_get_4xx_and_the_same_connection_serves_on(server, server_log):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    conn.connect()
    sock = conn.sock

    def post(path: str, body, **headers) -> tuple[int, dict]:
        conn.request("POST", path, body, {"Content-Type": "application/json", **headers})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    def answered_normally() -> None:
        status, body = post("/v1/completions", b'{"prompt": "ab", "max_tokens": 1}')
        assert status == 200 and body["usage"]["completion_tokens"] == 1
        assert conn.sock is sock  # the same keep-alive connection

    try:
        for path, body, status, fragment in _hostile():
            got, answer = post(path, body)
            assert got == status and fragment in answer["error"]["message"], (body[:80], answer)
            answered_normally()
        # A body of unknown length (chunked) is cut off as soon as it passes the bound.
        limit = max_body_bytes(SERVE, CONTEXT)
        chunks = (b"a" * (1 << 16) for _ in range(limit // (1 << 16) + 32))
        conn.request("POST", "/v1/completions", chunks, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413 and b"serve.max_body_bytes" in response.read()
        answered_normally()
        # Values that were once let through to the engine: top_k past int32 (now: no limit).
        status, _ = post("/v1/completions", b'{"prompt": "x", "top_k": 1000000000000}')
        assert status == 200
        answered_normally()
    finally:
        conn.close()
    assert server_log == []


def _rss() -> int:
    """This process's resident memory, in bytes."""
    with open("/proc/self/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)[1]) << 10


def test_an_oversize_body_is_refused_before_it_is_read(server):
    limit = max_body_bytes(SERVE, CONTEXT)
    before = _rss()
    # 200 MB declared: the answer comes after the headers, before any of the body is sent.
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 200000000\r\n\r\n")  # fmt: skip
        assert sock.recv(1 << 16).startswith(b"HTTP/1.1 413 ")
    # 200 MB offered with no length: the answer comes once the bound is passed.
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                     b"chunked\r\n\r\n")  # fmt: skip
        chunk, sent, peak = b"10000\r\n" + b"a" * (1 << 16) + b"\r\n", 0, before
        while sent < 200_000_000 and not select.select([sock], [], [], 0)[0]:
            sock.sendall(chunk)
            sent += 1 << 16
            peak = max(peak, _rss())
        assert sock.recv(1 << 16).startswith(b"HTTP/1.1 413 ")
    assert sent < limit + (16 << 20)  # (what the sockets' buffers held, besides the bound)
    assert peak - before < 64 << 20


def test_a_failed_step_fails_its_requests_not_the_server(server, engine, monkeypatch):
    def broken():
        monkeypatch.undo()  # once
        raise RuntimeError("injected device failure")

    monkeypatch.setattr(engine, "_decode", broken)
    failed = httpx.post(server.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 4},
                        timeout=WAIT_S)  # fmt: skip
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 4},
                    timeout=WAIT_S)  # fmt: skip
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_metrics(server):
    httpx.post(server.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 3},
               timeout=WAIT_S)  # fmt: skip
    text = httpx.get(server.url + "/metrics", timeout=WAIT_S).text
    for name in ("jaxpar_queue_length", "jaxpar_active_slots", "jaxpar_slots 4.0",
                 "jaxpar_prompt_tokens_total", "jaxpar_generation_tokens_total",
                 "jaxpar_time_to_first_token_seconds_bucket", "jaxpar_inter_token_latency_seconds",
                 "jaxpar_time_per_output_token_seconds", "jaxpar_prefix_cache_hit_rate",
                 'jaxpar_requests_total{endpoint="completions",status="200"}'):  # fmt: skip
        assert name in text, name


def test_api_keys(engine, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("\nkey-from-a-file\n")
    keys.chmod(0o644)
    warned = []
    config = dataclasses.replace(SERVE, api_key_file=str(keys))
    access = read_access(config, {KEY_ENV: "key-one, key-two"}, warn=warned.append)
    assert len(access.digests) == 3 and "can be read by other users" in warned[0]
    live = LiveServer(engine, "tiny", access)
    try:
        for key in ("key-one", "key-two", "key-from-a-file"):
            client = openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0)
            done = client.completions.create(model="tiny", prompt="ab", max_tokens=2)
            assert done.usage.completion_tokens == 2
        for key in ("key-three", "key-one2", "key-ONE"):  # (no key: the requests below)
            client = openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0)
            with pytest.raises(openai.AuthenticationError, match="API key"):
                client.models.list()
        for path in ("/v1/models", "/v1/nothing"):
            refused = httpx.get(live.url + path, timeout=WAIT_S)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer"
            assert refused.json()["error"]["code"] == "invalid_api_key"
            assert refused.json()["error"]["message"].startswith("no API key: send the header")
        assert httpx.get(live.url + "/health", timeout=WAIT_S).status_code == 200
        metrics = httpx.get(live.url + "/metrics", timeout=WAIT_S)  # open to this host
        assert metrics.status_code == 200
        assert 'jaxpar_requests_total{endpoint="unauthorized",status="401"} 5.0' in metrics.text
    finally:
        live.close()
    assert not any(key in metrics.text for key in ("key-one", "key-two", "key-from-a-file"))
    # /metrics: open to loopback clients, or to all, or to none (the key always).
    for setting, here, elsewhere in (("loopback", False, True), ("all", False, False),
                                     ("none", True, True)):  # fmt: skip
        rule = dataclasses.replace(access, open_metrics=setting)
        assert rule.needs_key("/metrics", "127.0.0.1") == here
        assert rule.needs_key("/metrics", "10.1.2.3") == elsewhere
        assert rule.needs_key("/v1/models", "127.0.0.1") and not rule.needs_key("/health", "::1")
    assert not Access().needs_key("/v1/models", "10.1.2.3")
    # One warning line for a server open to the network with no key.
    assert exposure_warning("0.0.0.0", 8000, Access()).count("with no API key") == 1
    assert exposure_warning("0.0.0.0", 8000, access) is None
    assert exposure_warning("127.0.0.1", 8000, Access()) is None


def _self_signed(folder, name: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 that signs itself, and its key: PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False,
                                     False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = folder / f"{name}.crt", folder / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return str(cert_file), str(key_file)


def test_tls_serves_the_greedy_text_of_generate(engine, generated, tmp_path):
    cert, key = _self_signed(tmp_path, "server")
    config = dataclasses.replace(SERVE, ssl_certfile=cert, ssl_keyfile=key)
    check_tls(config)
    live = LiveServer(engine, "tiny", config=config)
    try:
        trusted = httpx.Client(verify=ssl.create_default_context(cafile=cert))
        with openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0,
                           http_client=trusted) as client:  # fmt: skip
            done = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24,
                                             temperature=0)  # fmt: skip
        assert done.choices[0].text == generated[0]
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(live.url + "/health", timeout=WAIT_S)  # a client that does not trust it
    finally:
        live.close()
    other_cert, other_key = _self_signed(tmp_path, "other")
    mismatched = dataclasses.replace(config, ssl_keyfile=other_key)
    with pytest.raises(JaxparError, match=f"serve.ssl_keyfile '{other_key}' is not the key of"):
        check_tls(mismatched)
    with pytest.raises(JaxparError, match="must be a PEM certificate chain"):
        check_tls(dataclasses.replace(config, ssl_certfile=key))


# --- the command ------------------------------------------------------------------------------


class Launched:
    """`jaxpar launch -n 2 -- serve` on `mesh` (two processes of 2 simulated devices, one job),
    on a free port of 127.0.0.1, with `SERVE`'s settings and then `overrides`; every output
    line kept."""

    def __init__(self, run, mesh: str, *overrides: str, key: str = "unused"):
        serve = [f"serve.{f.name}={getattr(SERVE, f.name)}" for f in dataclasses.fields(SERVE)
                 if getattr(SERVE, f.name) != ""]  # fmt: skip
        serve += overrides
        argv = [sys.executable, "-m", "jaxpar", "launch", "-n", "2", "--devices-per-process", "2",
                "--", "serve", "--run", str(run), "--mesh", mesh, "--port", "0", "--model-name",
                "tiny", *serve]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", KEY_ENV: key}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout))
        self.reader.start()
        deadline = time.monotonic() + 180
        while not (found := re.search(r"^\[0\] jaxpar: serving .* on (\S+) ", self.output, re.M)):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output
            time.sleep(0.1)
        self.url = found.group(1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def pid(self, rank: int) -> int:
        return int(re.search(rf"process {rank} of 2: pid (\d+)", self.output).group(1))

    def stream(self, max_tokens: int):
        """A streamed greedy completion, its first chunk read."""
        chunks = iter(self.client.completions.create(
            model="tiny", prompt="x", max_tokens=max_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True}))  # fmt: skip
        next(chunks)
        return chunks

    def wait(self) -> int:
        code = self.proc.wait(timeout=60)  # a bound on a hang, not a speed
        self.reader.join(timeout=10)
        return code

    def close(self) -> None:
        """Ends the job (the processes too: they run in a session of their own)."""
        for rank in (0, 1):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid(rank), signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()
        self.reader.join(timeout=10)


def test_two_processes_serve_what_one_serves_and_fail_together(run, alone, generated):
    # A pipeline over the two processes: stage 0 on process 0's devices, stage 1 on process 1's.
    job = Launched(run, "pipeline=2,tensor=2")
    try:
        done = job.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24,
                                             temperature=0)  # fmt: skip
        assert done.choices[0].text == generated[0]
        # 8 concurrent requests over 4 slots (the 4 long ones preempt each other), against each
        # alone on one process's engine.
        picked = [*range(4), *range(12, 16)]
        work = [jobs(16)[i] for i in picked]

        def ask(job_: tuple[list[int], Params]) -> str:
            prompt, params = job_
            done = job.client.completions.create(model="tiny", prompt=prompt, temperature=0,
                                                 max_tokens=params.max_tokens)  # fmt: skip
            return done.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(len(work)) as pool:
            together = list(pool.map(ask, work))
        assert together == [alone[i].text for i in picked]
        metrics = httpx.get(job.url + "/metrics", timeout=WAIT_S).text
        assert float(re.search(r"^jaxpar_preemptions_total (\S+)", metrics, re.M)[1]) > 0
        assert re.search(r"^jaxpar_kv_blocks_used 0\.0$", metrics, re.M)
        # Process 1 dies mid-stream: the client gets an error, and the job ends, non-zero.
        chunks = job.stream(200)
        os.kill(job.pid(1), signal.SIGKILL)
        with pytest.raises(openai.APIError, match="generation failed on the device"):
            list(chunks)
        assert job.wait() != 0
        assert "[launch] process 1 killed by SIGKILL; stopping the others" in job.output
        assert "stopped: a step failed in lockstep with the other processes" in job.output
    finally:
        job.close()


def test_sigterm_to_process_0_drains_the_job_and_exits_0(run, generated):
    # `data` over the two processes: each holds half the slots.
    key = "sk-" + os.urandom(8).hex()  # (from the environment: never in a log line)
    job = Launched(run, "data=2,tensor=2", "serve.max_seqs=2", key=key)  # (a slot a shard)
    try:
        assert "(2 slots, 1 API key)" in job.output
        assert httpx.get(job.url + "/v1/models", timeout=WAIT_S).status_code == 401
        done = job.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24,
                                             temperature=0)  # fmt: skip
        assert done.choices[0].text == generated[0]
        chunks = job.stream(60)
        os.kill(job.pid(0), signal.SIGTERM)  # mid-stream: the stream still ends properly
        assert list(chunks)[-1].choices[0].finish_reason == "length"
        assert job.wait() == 0
        assert "[0] jaxpar: stopped" in job.output and key not in job.output
        with pytest.raises(httpx.ConnectError):
            httpx.get(job.url + "/health", timeout=5)
    finally:
        job.close()


@pytest.mark.parametrize("args, fragment", [
    (["--port", "70000"], "--port 70000 must be in [0, 65535]"),
    (["model.dim=64"], "serve takes serve.* settings only"),
    (["serve.max_seqs=0"], "'serve.max_seqs' must be positive"),
    (["--mesh", "data=4,context=2", "serve.prefill_chunk=33"],
     "serve.prefill_chunk=33 is not a multiple of context=2"),
    (["--mesh", "data=2,context=4", "serve.block_size=6"],
     "serve.block_size=6 must divide the model's context of 256 tokens and be a multiple of "
     "context=4"),
    (["--mesh", "data=8", "serve.block_size=48"],
     "serve.block_size=48 must divide the model's context of 256"),
    (["--mesh", "data=8", "serve.kv_blocks=15"], "serve.kv_blocks=15 blocks of 16 positions hold "
     "fewer than one request at the model's full context of 256 tokens; give at least 16"),
    (["serve.api_key_file=/no/keys"],
     "serve.api_key_file '/no/keys' cannot be read: No such file or directory"),
    (["serve.ssl_certfile=/no/cert"], "serve.ssl_certfile and serve.ssl_keyfile go together"),
    (["serve.ssl_certfile=/no/cert", "serve.ssl_keyfile=/no/key"],
     "serve.ssl_certfile '/no/cert' does not exist"),
    (["serve.open_metrics=yes"], "serve.open_metrics='yes' must be one of loopback, all, none"),
    (["serve.queue_timeout_s=nan"], "'serve.queue_timeout_s' must be positive"),
    (["serve.decode_steps=0"], "'serve.decode_steps' must be positive"),
    (["serve.speculative=ngram"], "serve.speculative 'ngram' must be ngram:K or draft:PATH:K"),
])  # fmt: skip
def test_serve_bad_input(capsys, run, args, fragment):
    assert main(["serve", "--run", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


def test_serve_refuses_a_taken_port(capsys, run):
    sock = bind("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert main(["serve", "--run", str(run), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    finally:
        sock.close()
