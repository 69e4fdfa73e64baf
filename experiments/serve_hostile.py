"""Hostile requests against a live `jaxpar serve`: what each one gets, whether the same keep-alive
connection then serves a normal request, and what the server's memory does.

Usage: cd experiments && python serve_hostile.py [--key KEY] [--huge-mb 200] [--name NAME]

The server is a real `jaxpar serve` subprocess on 127.0.0.1 (one CPU device) serving a 4-layer
byte model (dim 64, context 256) trained for one step, started with `JAXPAR_API_KEY` set to
`--key` (every request below sends it; an older server that knows no keys ignores the header).
Each row is one request on one `http.client` connection, followed on the same connection by a
normal completion (`"prompt": "ab", "max_tokens": 1`); reported: the status and message, the
seconds it took, whether the follow-up was answered 200 on the same socket, and the rise of the
server's resident memory (VmRSS, sampled every 10 ms) over its value before the request. Then
the server's own output is searched for tracebacks.

The rows: every field of both endpoints given a wrong type; NaN, Infinity and -Infinity in every
float field; JSON nested 100,000 deep; invalid UTF-8; 100,001 stop strings; no messages; a
30 MB prompt; a `--huge-mb` body sent whole with its length declared, and one sent chunked with
no length; ids and seeds past 64 bits; `top_k` past int32; no key and a wrong key. Writes
results/NAME.json and .md (NAME: serve_hostile).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import train_one_step, write_results

MODEL = ["model.layers=4", "model.dim=64", "model.heads=4", "model.kv_heads=4",
         "model.mlp_dim=176"]  # fmt: skip
CONTEXT = 256
WAIT_S = 300
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
FIELDS = {  # every field of the two request models, and whether it is a number
    "/v1/completions": ["prompt", "model", "max_tokens", "temperature", "top_p", "top_k", "n",
                        "seed", "stop", "stop_token_ids", "ignore_eos", "presence_penalty",
                        "frequency_penalty", "top_logprobs", "stream", "stream_options", "user",
                        "echo", "best_of", "logprobs"],
    "/v1/chat/completions": ["messages", "model", "max_tokens", "max_completion_tokens",
                             "temperature", "top_p", "top_k", "n", "seed", "stop",
                             "stop_token_ids", "ignore_eos", "presence_penalty",
                             "frequency_penalty", "top_logprobs", "stream", "stream_options",
                             "user", "logprobs"],
}  # fmt: skip
FLOATS = ["temperature", "top_p", "presence_penalty", "frequency_penalty"]


class Server:
    """`jaxpar serve` in a subprocess on a free port of 127.0.0.1; its output kept."""

    def __init__(self, run: Path, key: str):
        argv = [sys.executable, "-m", "jaxpar", "serve", "--run", str(run), "--port", "0",
                "--model-name", "m"]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAXPAR_API_KEY": key}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)  # fmt: skip
        self.lines: list[str] = []
        deadline = time.monotonic() + WAIT_S
        self.port = None
        while self.port is None:
            line = self.proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError("jaxpar serve did not start:\n" + "".join(self.lines))
            self.lines.append(line)
            found = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            self.port = found and int(found.group(1))
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout))
        self.reader.start()

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)[1]) << 10

    def close(self) -> str:
        self.proc.terminate()
        self.proc.wait(WAIT_S)
        self.reader.join(WAIT_S)
        return "".join(self.lines)


class Peak:
    """The most a process's resident memory rose above its value at the start, sampled every
    10 ms while the block runs."""

    def __init__(self, server: Server):
        self.server, self.rise = server, 0

    def __enter__(self) -> Peak:
        self.base, self.done = self.server.rss(), threading.Event()

        def sample() -> None:
            while not self.done.wait(0.01):
                self.rise = max(self.rise, self.server.rss() - self.base)

        self.thread = threading.Thread(target=sample)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def hostile(huge_mb: int) -> list[tuple[str, str, bytes | object, dict]]:
    """(what, path, body, extra headers) for each row."""
    rows = []
    for path, fields in FIELDS.items():
        base = {"prompt": "x"} if "prompt" in fields else CHAT
        for name in fields:
            rows.append((f"`{name}` of a wrong type ([{{}}])", path,
                         json.dumps({**base, name: [{}]}).encode(), {}))  # fmt: skip
        for name in FLOATS:
            for bad in ("NaN", "Infinity", "-Infinity"):
                body = json.dumps(base).encode()[:-1] + f', "{name}": {bad}}}'.encode()
                rows.append((f"`{name}`: {bad}", path, body, {}))
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    big = 30_000_000
    rows += [
        ("JSON nested 100,000 deep", "/v1/chat/completions", deep, {}),
        ("invalid UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', {}),
        ("100,001 stop strings", "/v1/completions",
         b'{"prompt": "x", "stop": [' + b'"a",' * 100_000 + b'"a"]}', {}),
        ("no messages", "/v1/chat/completions", b'{"messages": []}', {}),
        ("a message with no role", "/v1/chat/completions", b'{"messages": [{"content": "x"}]}',
         {}),
        ("a 30 MB prompt", "/v1/completions", b'{"prompt": "' + b"a" * big + b'"}', {}),
        (f"a {huge_mb} MB body, length declared", "/v1/completions",
         b'{"prompt": "' + b"a" * (huge_mb * 1_000_000) + b'"}', {}),
        (f"a {huge_mb} MB body, chunked", "/v1/completions",
         _chunks(huge_mb * 1_000_000), {}),
        ("an id past 64 bits", "/v1/completions", b'{"prompt": [' + b"9" * 30 + b"]}", {}),
        ("a seed past 64 bits", "/v1/completions",
         b'{"prompt": "x", "seed": ' + b"9" * 30 + b"}", {}),
        ("`top_k` past int32", "/v1/completions",
         b'{"prompt": "x", "top_k": 1000000000000, "max_tokens": 1}', {}),
        ("a stop id outside the vocabulary", "/v1/completions",
         b'{"prompt": "x", "stop_token_ids": [300]}', {}),
        ("no key", "/v1/models", None, {"Authorization": ""}),
        ("a wrong key", "/v1/completions", b'{"prompt": "x"}',
         {"Authorization": "Bearer wrong"}),
    ]  # fmt: skip
    return rows


class _chunks:
    """A body of `size` bytes handed to http.client as an iterable: sent chunked."""

    def __init__(self, size: int):
        self.size = size

    def __iter__(self):
        piece = b"a" * (1 << 20)
        yield b'{"prompt": "'
        for _ in range(self.size // len(piece)):
            yield piece
        yield b'"}'


def ask(conn: http.client.HTTPConnection, path: str, body, headers: dict) -> tuple[int, str]:
    method = "GET" if body is None else "POST"
    chunked = isinstance(body, _chunks)
    conn.request(method, path, body, headers, encode_chunked=chunked)
    response = conn.getresponse()
    text = response.read().decode(errors="replace")
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text
    return response.status, message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", default="sk-experiment", help="the server's API key")
    parser.add_argument("--huge-mb", type=int, default=200, help="the largest body, in MB")
    parser.add_argument("--name", default="serve_hostile", help="results/NAME.json and .md")
    args = parser.parse_args()
    auth = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    with tempfile.TemporaryDirectory() as tmp:
        print("training the model ...", file=sys.stderr, flush=True)
        server = Server(train_one_step(Path(tmp) / "model", MODEL, CONTEXT), args.key)
        rows = []
        try:
            table = hostile(args.huge_mb)
            for i, (what, path, body, headers) in enumerate(table):
                print(f"[{i + 1}/{len(table)}] {what}", file=sys.stderr, flush=True)
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
                conn.connect()
                sock = conn.sock
                row = {"request": what, "path": path}
                with Peak(server) as peak:
                    start = time.perf_counter()
                    try:
                        row["status"], row["message"] = ask(conn, path, body,
                                                            {**auth, **headers})  # fmt: skip
                    except (OSError, http.client.HTTPException) as e:
                        row["status"], row["message"] = "-", f"{type(e).__name__}: {e}"
                    row["seconds"] = time.perf_counter() - start
                row["rss_rise_mb"] = peak.rise / 1e6
                try:
                    status, _ = ask(conn, "/v1/completions",
                                    b'{"prompt": "ab", "max_tokens": 1}', auth)  # fmt: skip
                    row["then"] = f"{status}, same connection" if conn.sock is sock else (
                        f"{status}, new connection")  # fmt: skip
                except (OSError, http.client.HTTPException) as e:
                    row["then"] = f"{type(e).__name__} on the same connection"
                conn.close()
                rows.append(row)
        finally:
            log = server.close()
    tracebacks = log.count("Traceback")
    print(f"tracebacks in the server's log: {tracebacks}", file=sys.stderr)
    rows.append({"request": "(tracebacks in the server's log)", "path": "", "status": tracebacks,
                 "message": "", "seconds": 0.0, "rss_rise_mb": 0.0, "then": ""})  # fmt: skip

    def cells(r: dict) -> list:
        message = r["message"].replace("|", "\\|").replace("\n", " ")
        message = message if len(message) <= 110 else message[:107] + "..."
        return [r["request"], r["path"], r["status"], message, f"{r['seconds']:.3f}",
                f"{r['rss_rise_mb']:.1f}", r["then"]]  # fmt: skip

    write_results(args.name, rows, ["request", "path", "status", "answer", "s", "RSS rise MB",
                                    "then a normal request"], cells)  # fmt: skip


if __name__ == "__main__":
    main()
