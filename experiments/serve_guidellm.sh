#!/usr/bin/env bash
# Third-party serving benchmark: GuideLLM (https://github.com/vllm-project/guidellm) against
# `jaxpar serve`, run as a user would run it, offline.
#
# Usage: bash experiments/serve_guidellm.sh   (2.5 to 3 minutes on a 2-core CPU host)
#
# Needs guidellm installed separately (`pip install guidellm`, ideally in its own virtual
# environment; tested with 0.8.1): set GUIDELLM=/path/to/guidellm if it is not on PATH, and
# JAXPAR=/path/to/jaxpar likewise. Nothing is downloaded: guidellm runs with HF_HUB_OFFLINE=1.
#
# What it runs, in a temporary folder (removed at the end):
#  1. `jaxpar train` of serve_load.py's model (4 layers, dim 128, 8 heads, 8 kv heads, MLP 352,
#     byte vocabulary, context 1024) for one step on a toy corpus (its output is noise; every
#     request decodes exactly its max tokens because guidellm sends ignore_eos);
#  2. `jaxpar serve --run run --port 0 --model-name m serve.max_seqs=8` (127.0.0.1; stopped
#     with SIGTERM at the end);
#  3. guidellm needs a Hugging Face tokenizer to build prompts of a given token count and to
#     count tokens. A jaxpar run has none (bytes are its tokens), so the script writes one: a
#     byte-level BPE `tokenizer.json` with no merges whose ids are the UTF-8 bytes, which is
#     exactly how `jaxpar serve` tokenizes a run's text. guidellm loads it from the folder with
#     `--tokenizer kind=huggingface_auto,model=DIR`;
#  4. `guidellm run` with its default backend (openai_http, streaming /v1/chat/completions):
#     synthetic prompts of 128 tokens and 64 output tokens, the concurrent profile at 1, 8
#     and 16 streams (16: more streams than the server's 8 slots), each benchmark bounded by
#     20 s (and 2000 requests), the first 10% of each benchmark's time left out as warm-up
#     (guidellm prints its console summary whenever the console is on).
#
# Writes experiments/results/serve_guidellm.json (guidellm's JSON report, per-request records
# kept for a sample of 20 requests per status), serve_guidellm_console.txt (its console tables)
# and serve_guidellm.md (a short table of what guidellm reported, made from the JSON).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
RESULTS="$HERE/results"
JAXPAR=${JAXPAR:-jaxpar}
GUIDELLM=${GUIDELLM:-guidellm}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
SERVER=""

cleanup() {
    if [[ -n "$SERVER" ]] && kill -0 "$SERVER" 2>/dev/null; then
        kill -TERM "$SERVER"
        wait "$SERVER" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
mkdir -p "$RESULTS"
cd "$WORK"

echo "== 1. train (one step)" >&2
for _ in $(seq 400); do echo "the quick brown fox jumps over the lazy dog"; done > corpus.txt
"$JAXPAR" train --mesh data=1 model.layers=4 model.dim=128 model.heads=8 model.kv_heads=8 \
    model.mlp_dim=352 model.vocab=256 train.seq_len=1024 train.batch_size=2 train.steps=1 \
    train.sample_tokens=0 train.warmup_steps=0 data.path=corpus.txt --out run > train.log 2>&1 \
    || { cat train.log >&2; exit 1; }

echo "== 2. serve" >&2
"$JAXPAR" serve --run run --port 0 --model-name m serve.max_seqs=8 > serve.out 2> serve.err &
SERVER=$!
URL=""
for _ in $(seq 300); do
    URL=$(grep -o 'http://127\.0\.0\.1:[0-9]*' serve.err | head -n 1 || true)
    [[ -n "$URL" ]] && break
    kill -0 "$SERVER" 2>/dev/null || { cat serve.err >&2; exit 1; }
    sleep 1
done
[[ -n "$URL" ]] || { echo "jaxpar serve did not start" >&2; cat serve.err >&2; exit 1; }
cat serve.err >&2

echo "== 3. byte-level tokenizer for guidellm" >&2
"$PY" - tokenizer <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
out.mkdir()
# GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits); with no
# merges, byte b is the one token whose id is b.
bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
cs = bs[:]
for b in range(256):
    if b not in bs:
        bs.append(b)
        cs.append(256 + len(cs) - 188)
vocab = {chr(c): b for b, c in zip(bs, cs)}
byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
tokenizer = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
    "normalizer": None, "post_processor": None,
    "pre_tokenizer": {"type": "ByteLevel", **byte_level},
    "decoder": {"type": "ByteLevel", **byte_level},
    "model": {"type": "BPE", "dropout": None, "unk_token": None,
              "continuing_subword_prefix": None, "end_of_word_suffix": None,
              "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
              "vocab": vocab, "merges": []},
}
(out / "tokenizer.json").write_text(json.dumps(tokenizer))
(out / "tokenizer_config.json").write_text(
    json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1024}))
EOF

echo "== 4. guidellm against $URL" >&2
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$GUIDELLM" run \
    --backend "kind=openai_http,target=$URL,model=m" \
    --tokenizer "kind=huggingface_auto,model=$WORK/tokenizer" \
    --data kind=synthetic_text,prompt_tokens=128,output_tokens=64 \
    --profile kind=concurrent,warmup=0.1 --override profile.streams 1,8,16 \
    --constraint kind=max_duration,seconds=20 --constraint kind=max_requests,count=2000 \
    --metrics kind=generative,sample_size=20 \
    --output "kind=json,path=$WORK/guidellm.json" \
    --disable-progress 2>&1 | tee console.txt

cp guidellm.json "$RESULTS/serve_guidellm.json"
cp console.txt "$RESULTS/serve_guidellm_console.txt"

"$PY" - "$RESULTS/serve_guidellm.json" "$RESULTS/serve_guidellm.md" "$($GUIDELLM --version)" <<'EOF'
import json, sys

report = json.load(open(sys.argv[1]))
rows = []
for bench in report["benchmarks"]:
    m, strategy = bench["metrics"], bench["config"]["strategy"]
    name = strategy["type_"] + (f" {strategy['streams']}" if "streams" in strategy else "")
    totals = m["request_totals"]

    def lat(key):
        s = m[key]["successful"]
        return [f"{s['mean']:.1f}", f"{s['median']:.1f}", f"{s['percentiles']['p99']:.1f}"]

    rows.append(
        [name, f"{totals['successful']} / {totals['errored']} / {totals['incomplete']}",
         f"{bench['duration']:.1f}",
         f"{m['prompt_token_count']['successful']['mean']:.0f}",
         f"{m['output_token_count']['successful']['mean']:.0f}",
         f"{m['requests_per_second']['total']['mean']:.2f}",
         f"{m['output_tokens_per_second']['total']['mean']:.0f}",
         *lat("time_to_first_token_ms"), *lat("inter_token_latency_ms"),
         *lat("time_per_output_token_ms")])
head = ["profile (streams)", "requests ok / err / incomplete", "duration s", "prompt tok",
        "output tok", "requests/s", "output tok/s", "TTFT ms mean", "median", "p99",
        "ITL ms mean", "median", "p99", "TPOT ms mean", "median", "p99"]
lines = [
    "# guidellm against `jaxpar serve` (`experiments/serve_guidellm.sh`)", "",
    f"{sys.argv[3]}, its default backend (openai_http, streaming /v1/chat/completions):"
    " synthetic prompts of 128 tokens, 64 output tokens (sent with ignore_eos), concurrent"
    " profile, each benchmark bounded by 20 s of which the first 10% is warm-up (duration s:"
    " the rest). Model: 4 layers, dim 128, byte vocabulary, float32, `serve.max_seqs=8`, one"
    " CPU device; guidellm runs on the same shared 2-core host. Names and statistics as"
    " guidellm reports them: requests/s and output tok/s are its means over all requests (its"
    " \"Server Throughput\" table), TTFT, ITL and TPOT are over completed requests; prompt tok"
    " is the server's count (the 128-token prompt plus the chat template); incomplete: in"
    " flight when the time ran out (cancelled by guidellm).", "",
    "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
    *("| " + " | ".join(r) + " |" for r in rows), "",
]
open(sys.argv[2], "w").write("\n".join(lines))
print("\n".join(lines))
EOF
echo "wrote $RESULTS/serve_guidellm.json, serve_guidellm_console.txt, serve_guidellm.md" >&2
