"""`jaxpar serve`: continuous batching against one request at a time and against `generate`, the
prefix cache, and the OpenAI HTTP API (the official client, streaming, errors, load and faults)
on a live server bound to 127.0.0.1."""

import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
import uvicorn

from jaxpar.cli import main
from jaxpar.config import ServeConfig
from jaxpar.infer.chat import PLAIN_TEMPLATE, render_chat
from jaxpar.infer.load import load_run
from jaxpar.infer.sampling import GREEDY, Sampling
from jaxpar.infer.scheduler import Engine, Params
from jaxpar.infer.server import bind, create_app
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
    """`create_app` under uvicorn on a thread, on a free port of 127.0.0.1."""

    def __init__(self, engine: Engine, name: str):
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(engine, name), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
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
    # `generate`.
    mesh_engine = engine if spec == "data=1" else Engine(loaded(run, spec), SERVE).start()
    work = jobs(16)
    together = [r.tokens for r in submit_and_wait(mesh_engine, work)]
    assert together == [r.tokens for r in alone]
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


def test_a_cache_split_over_context_serves_what_one_device_serves(run, engine, generated):
    # context=2: every slot's positions striped over two devices, prompts prefilled as pieces
    # split over them (32-token pieces, and prompts up to 70 tokens: several each), the prefix
    # pool striped likewise.
    split = Engine(loaded(run, "context=2"), SERVE).start()
    live = None
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
        live = LiveServer(split, "tiny")
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        for prompt, expected in zip(PROMPTS, generated, strict=False):
            done = client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                             temperature=0)  # fmt: skip
            assert done.choices[0].text == expected
    finally:
        if live is not None:
            live.close()
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
    """Engine turns this much slower: a long request then runs for seconds, not milliseconds."""
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(seconds), step()))


def test_a_cancelled_stream_frees_its_slot(server, engine, monkeypatch):
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
    out = httpx.post(server.url + "/v1/completions", json={"prompt": "ab", "max_tokens": 2},
                     timeout=WAIT_S)  # fmt: skip
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 2


def test_a_full_queue_gives_429(server, engine, monkeypatch):
    monkeypatch.setattr(engine, "config", dataclasses.replace(SERVE, max_queue=2))
    slow_decoding(engine, monkeypatch)
    streams = _open_streams(server, engine.slots)
    waiting = []

    def wait_in_queue():
        body = {"prompt": "q", "max_tokens": 2}
        waiting.append(httpx.post(server.url + "/v1/completions", json=body, timeout=WAIT_S))

    threads = [threading.Thread(target=wait_in_queue) for _ in range(engine.config.max_queue)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: engine.queue_length == engine.config.max_queue, "the queue to fill")
        full = httpx.post(server.url + "/v1/completions", json={"prompt": "q"}, timeout=WAIT_S)
        assert full.status_code == 429
        assert full.json()["error"]["type"] == "rate_limit_error"
        assert "serve.max_queue = 2" in full.json()["error"]["message"]
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
        for t in threads:
            t.join(WAIT_S)
    assert [r.status_code for r in waiting] == [200] * engine.config.max_queue
    metrics = httpx.get(server.url + "/metrics", timeout=WAIT_S).text
    assert 'jaxpar_requests_total{endpoint="completions",status="429"} 1.0' in metrics


BAD = [
    ("/v1/completions", "{not json", 400, "not valid JSON"),
    ("/v1/completions", "[1, 2]", 400, "must be a JSON object"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "'max_tokens' must be at least 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "must be an integer"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "must be a number"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "'temperature' must be in"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "'top_p' must be in (0, 1]"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "'stream' must be true or false"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "'n' = 2 is not supported"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, "'stop' must be"),
    ("/v1/completions", {"prompt": ""}, 400, "'prompt' is empty"),
    ("/v1/completions", {"prompt": 5}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": [300]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x" * 250, "max_tokens": 10}, 400,
     "prompt of 250 tokens + max_tokens 10 exceeds the model's context of 256"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "the model 'gpt-4' does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "'messages' must be a non-empty array"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "must be an object with a"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400,
     "content must be a string"),
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


# --- the command ------------------------------------------------------------------------------


class Launched:
    """`jaxpar launch -n 2 -- serve` on `mesh` (two processes of 2 simulated devices, one job),
    on a free port of 127.0.0.1, with `SERVE`'s settings and then `overrides`; every output
    line kept."""

    def __init__(self, run, mesh: str, *overrides: str):
        serve = [f"serve.{f.name}={getattr(SERVE, f.name)}" for f in dataclasses.fields(SERVE)]
        serve += overrides
        argv = [sys.executable, "-m", "jaxpar", "launch", "-n", "2", "--devices-per-process", "2",
                "--", "serve", "--run", str(run), "--mesh", mesh, "--port", "0", "--model-name",
                "tiny", *serve]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

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
        for prompt, expected in zip(PROMPTS, generated, strict=False):
            done = job.client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                                 temperature=0)  # fmt: skip
            assert done.choices[0].text == expected
        # 16 concurrent requests over 4 slots, against each alone on one process's engine.
        work = jobs(16)

        def ask(job_: tuple[list[int], Params]) -> str:
            prompt, params = job_
            done = job.client.completions.create(model="tiny", prompt=prompt, temperature=0,
                                                 max_tokens=params.max_tokens)  # fmt: skip
            return done.choices[0].text

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            together = list(pool.map(ask, work))
        assert together == [r.text for r in alone]
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
    job = Launched(run, "data=2,tensor=2", "serve.max_seqs=2")  # (a slot a shard: few compiles)
    try:
        done = job.client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24,
                                             temperature=0)  # fmt: skip
        assert done.choices[0].text == generated[0]
        chunks = job.stream(60)
        os.kill(job.pid(0), signal.SIGTERM)  # mid-stream: the stream still ends properly
        assert list(chunks)[-1].choices[0].finish_reason == "length"
        assert job.wait() == 0
        assert "[0] jaxpar: stopped" in job.output
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
