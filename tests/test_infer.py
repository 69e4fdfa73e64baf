"""Inference: KV-cached decoding against recomputation, one device against a 3-axis mesh, and the
`eval`, `generate`, `chat` and `export-hf` commands end to end."""

import codecs
import functools
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from jaxpar.cli import main
from jaxpar.config import load_config
from jaxpar.infer.engine import Generator
from jaxpar.infer.loaded import LoadedModel
from jaxpar.infer.sampling import GREEDY, RowSampling, Sampling, sample, speculative_accept
from jaxpar.infer.speculate import ModelDrafter, NgramDrafter
from jaxpar.mesh import make_mesh, parse_mesh
from jaxpar.placement import Placement, serving_config
from jaxpar.train.step import Trainer

SIZES = [
    "model.layers=3", "model.dim=32", "model.heads=4", "model.kv_heads=2", "model.mlp_dim=64",
]  # fmt: skip
SPMD = "data=2,pipeline=2,tensor=2"
CONTEXT = "pipeline=2,context=2,tensor=2"  # the cache's positions split over `context`
ROWS, MAX_LEN = 4, 24


@functools.cache
def logical_params() -> nnx.State:
    """The model's parameters in layer order, on the host: initialised once, on one device (an
    initialisation is a compile per layout; that it is the same on every layout is
    test_parallel's to show)."""
    mesh = make_mesh(parse_mesh("data=1"), jax.devices()[:1])
    placement = Placement(serving_config(load_config(None, SIZES)), mesh)
    with jax.set_mesh(mesh):
        params = Trainer(placement).init_state(0).params
        return jax.tree.map(np.asarray, jax.jit(placement.to_logical)(params))


def params_for(placement: Placement) -> nnx.State:
    """`logical_params` in `placement`'s (training) layout."""
    move = jax.jit(placement.from_logical, out_shardings=placement.param_shardings)
    with jax.set_mesh(placement.mesh):
        return move(logical_params())


@functools.cache
def setup(spec: str, kv_blocks: int = 0):
    """The model (the same parameters on every `spec`), its generator (paged: `kv_blocks` blocks
    of 4 positions per data shard) and a full-recompute forward."""
    # Over `context`, a piece's queries are attended 4 at a time (several blocks a piece); on two
    # stages, the first holds one layer and a padded slot, the second two layers.
    blocks = ["model.attention_block=4"] if "context" in spec else []
    split = ["pipeline.stage_layers=[1,2]"] if "pipeline=2" in spec else []
    config = serving_config(load_config(None, [*SIZES, *blocks, *split]))
    s = parse_mesh(spec)
    mesh = make_mesh(s, jax.devices()[: s.size])
    placement = Placement(config, mesh)
    params = params_for(placement)
    gen = Generator(Placement(config, mesh, serving=True), params, batch=ROWS, max_len=MAX_LEN,
                    blocks=kv_blocks, block=4)  # fmt: skip
    tokens = np.random.default_rng(0).integers(0, 256, (ROWS, 20)).astype(np.int32)
    with jax.set_mesh(mesh):
        full = jax.jit(lambda p, t: nnx.merge(placement.graphdef, p)(t))(params, tokens)
    return gen, tokens, np.asarray(full)


@pytest.mark.parametrize("spec", ["data=1", SPMD, CONTEXT])
def test_cached_decoding_equals_recomputation_at_every_position(spec):
    gen, tokens, full = setup(spec)
    lengths = np.array([5, 8, 3, 16], np.int32)  # ragged prompts, right-padded to 16
    prompts = np.where(np.arange(16)[None] < lengths[:, None], tokens[:, :16], 0)
    cache, logits, _ = gen.prefill(gen.empty_cache(), prompts, lengths)
    rows = np.arange(ROWS)
    np.testing.assert_allclose(logits, full[rows, lengths - 1], rtol=0, atol=2e-5)
    position = lengths.copy()
    for _ in range(4):  # teacher-forced: feed the true next token, compare the next logits
        cache, logits, _ = gen.decode(cache, tokens[rows, position], position)
        np.testing.assert_allclose(logits[:, 0], full[rows, position], rtol=0, atol=2e-5)
        position += 1


def test_greedy_output_is_the_same_on_one_device_and_on_a_3d_mesh():
    prompts = [[1, 2, 3], [70, 71, 72, 73, 74], [9], [200, 100]]
    one = setup("data=1")[0].generate(prompts, 8, GREEDY)
    for spec in (SPMD, CONTEXT):
        assert setup(spec)[0].generate(prompts, 8, GREEDY).new_ids == one.new_ids, spec
    assert [len(ids) for ids in one.new_ids] == [8] * 4
    assert one.prefill_s > 0 and len(one.decode_s) == 7 and one.tokens_per_s > 0


class WrongDrafter(NgramDrafter):
    """Drafts that are always wrong: each of `expected`'s next tokens plus one."""

    def __init__(self, k: int, prompts, expected):
        super().__init__(k)
        self.prompts, self.expected = prompts, expected

    def propose(self, sequence, k):
        row = next(i for i, p in enumerate(self.prompts) if sequence[: len(p)] == list(p))
        done = len(sequence) - len(self.prompts[row])
        return [(t + 1) % 256 for t in self.expected[row][done : done + k]]


def test_blocks_and_speculation_give_the_tokens_of_one_step_decoding():
    # Decode blocks (a stop id in the middle of one), n-gram drafts, drafts that are always
    # wrong and a draft model (the target itself: every draft kept), batched and batch 1, on the
    # 3-D mesh (whose one-step tokens are one device's: test_greedy_output_is_the_same_...):
    # the greedy tokens of one step a dispatch; sampled ones reproducible from their seed.
    gen = setup(SPMD)[0]
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2], [70, 71, 72, 73, 74], [9], [200, 100]]
    one_step = gen.generate(prompts, 12, GREEDY, steps=1).new_ids
    stop = one_step[1][6]
    stopped = gen.generate(prompts, 12, GREEDY, steps=1, stop_ids=[stop]).new_ids
    assert len(stopped[1]) < 12  # (stops after its 7th token: within the second block of 5)
    params = params_for(Placement(gen.placement.config, gen.mesh))
    itself = LoadedModel(gen.placement, params, MAX_LEN, None, (), "the target")
    drafters = {"ngram": NgramDrafter(3), "wrong": WrongDrafter(3, prompts, one_step),
                "model": ModelDrafter(itself, 3, gen.rows, MAX_LEN)}  # fmt: skip
    ways = [("block", {"steps": 5}), *((n, {"drafter": d}) for n, d in drafters.items())]
    for name, kwargs in ways:
        for rows in (slice(None), slice(1, 2)):
            out = gen.generate(prompts[rows], 12, GREEDY, **kwargs)
            assert out.new_ids == one_step[rows], (name, rows)
        assert gen.generate(prompts, 12, GREEDY, stop_ids=[stop], **kwargs).new_ids == stopped
        if name != "block":
            assert out.passes > 0 and 0 <= out.accepted <= out.drafted
            assert (out.accepted == 0) == (name == "wrong") or name == "ngram"
            sampling = Sampling(0.9, top_k=20)
            first, again = (gen.generate(prompts, 12, sampling, seed=5, **kwargs) for _ in "ab")
            alone = gen.generate(prompts[1:2], 12, sampling, seed=6, **kwargs)  # (row 1's seed)
            assert first.new_ids == again.new_ids and alone.new_ids[0] == first.new_ids[1], name
    assert out.accepted == out.drafted > 0  # the target as its own draft model keeps all


def test_speculative_sampling_keeps_the_target_distribution():
    # Many rows, one position: the first token after a draft from q (a point mass, as n-gram
    # drafts are, or a distribution of its own, drawn with the same top-k) is distributed as the
    # target's p with the row's top-k.
    rows, vocab = 20000, 5
    p = np.array([0.1, 0.4, 0.2, 0.25, 0.05])
    q = np.array([0.45, 0.1, 0.15, 0.05, 0.25])
    logits = jax.numpy.broadcast_to(jax.numpy.log(p).astype(np.float32), (rows, 2, vocab))
    rng = np.random.default_rng(0)
    for top_k, drafter in [(0, "point"), (0, "q"), (3, "q")]:
        kept_q = np.where(q >= np.sort(q)[-top_k], q, 0) if top_k else q
        drafts = rng.choice(vocab, (rows, 1), p=kept_q / kept_q.sum()).astype(np.int32)
        d_logits = None
        if drafter == "point":
            drafts[:] = 1
        else:
            d_logits = jax.numpy.broadcast_to(jax.numpy.log(q).astype(np.float32), (rows, 1, vocab))
        sampling = RowSampling.fill(rows, Sampling(1.0, top_k=top_k), np.arange(rows))
        out = np.asarray(speculative_accept(logits, drafts, np.ones(rows, np.int32), sampling,
                                            d_logits))  # fmt: skip
        freq = np.bincount(out[:, 0], minlength=vocab) / rows
        kept_p = np.where(p >= np.sort(p)[-top_k], p, 0) if top_k else p
        # (20,000 draws: a standard error of at most 0.0035 a token)
        np.testing.assert_allclose(freq, kept_p / kept_p.sum(), atol=0.012)


def test_decode_is_compiled_once():
    gen = setup(SPMD)[0]
    gen.generate([[1, 2]], 3, GREEDY)
    before = gen.compile_s
    out = gen.generate([[5, 6, 7]], 6, Sampling(temperature=0.9, top_k=5, top_p=0.9), seed=3)
    assert gen.compile_s == before and out.compile_s == 0  # same prompt width, nothing new
    again = gen.generate([[5, 6, 7]], 6, Sampling(temperature=0.9, top_k=5, top_p=0.9), seed=3)
    assert again.new_ids == out.new_ids  # seeded


def test_sampling_filters():
    logits = jax.numpy.asarray([[0.0, 3.0, 1.0, 2.0]] * 64)
    # compiled once, as the decode step holds it: the settings are traced values (called
    # eagerly, each call would compile its lax.cond again)
    jitted = jax.jit(sample)

    def draw(temperature, top_k, top_p, seed):
        rows = RowSampling.fill(64, Sampling(temperature, top_k, top_p), seed + np.arange(64))
        return np.asarray(jitted(logits, rows))

    assert (draw(0.0, 0, 1.0, 0) == 1).all()
    for seed in range(0, 20 * 64, 64):
        assert (draw(1.0, 1, 1.0, seed) == 1).all()  # top-k 1 is greedy
        assert set(draw(1.0, 2, 1.0, seed).tolist()) <= {1, 3}
        assert (draw(1.0, 0, 0.5, seed) == 1).all()  # p(1) = 0.64 alone covers 0.5
    assert len(set(draw(1.0, 0, 1.0, 0).tolist())) > 1  # rows draw with their own keys


def test_per_row_settings_mix_in_one_batch():
    logits = jax.numpy.asarray([[0.0, 3.0, 1.0, 2.0]] * 4)
    rows = RowSampling(
        seed=np.arange(4, dtype=np.int32), count=np.zeros(4, np.int32),
        temperature=np.array([0, 1, 1, 5], np.float32), top_k=np.array([0, 1, 2, 0], np.int32),
        top_p=np.array([1, 1, 1, 1e-3], np.float32),
    )  # fmt: skip
    assert np.asarray(sample(logits, rows)).tolist()[:2] == [1, 1]
    assert (
        np.asarray(sample(logits, rows))[2] in (1, 3) and np.asarray(sample(logits, rows))[3] == 1
    )


# --- the commands -----------------------------------------------------------------------------

TINY_RUN = [*SIZES, "train.batch_size=8", "train.seq_len=32", "train.steps=2",
            "train.sample_tokens=0", "train.warmup_steps=1"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("infer") / "run"
    text = out.parent / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    argv = ["train", "--out", str(out), "--mesh", "data=4,tensor=2", *TINY_RUN,
            f"data.path={text}"]  # fmt: skip
    assert main(argv) == 0
    return out, text


def _json(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out)


def test_eval_is_the_same_on_every_mesh(capsys, run_dir, tmp_path):
    run, text = run_dir
    ids = np.frombuffer(text.read_bytes()[:99], np.uint8).astype(np.int32).reshape(3, 33)
    np.save(tmp_path / "ids.npy", ids)
    results = [
        _json(capsys, ["eval", "--run", str(run), "--mesh", mesh, "--json", *source])
        for mesh in ("data=8", SPMD)
        for source in (["--text", str(text)], ["--tokens", str(tmp_path / "ids.npy")])
    ]
    text_tokens = len(text.read_bytes()) - 1
    assert [r["tokens"] for r in results] == [text_tokens, 3 * 32, text_tokens, 3 * 32]
    for a, b in ((results[0], results[2]), (results[1], results[3])):
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
        assert a["perplexity"] == pytest.approx(math.exp(a["nll"]))
    assert 0 < results[0]["nll"] < math.log(256) + 0.5


def test_generate_from_a_run_and_from_its_hugging_face_export(capsys, run_dir, tmp_path):
    run, _ = run_dir
    argv = ["--mesh", SPMD, "--greedy", "--max-new-tokens", "6", "--json"]
    jaxpar = _json(capsys, ["generate", "--run", str(run), "--prompt", "the ", "--prompt",
                            "fox", *argv])  # fmt: skip
    assert [len(ids) for ids in jaxpar["new_ids"]] == [6, 6]
    assert jaxpar["text"] == [bytes(ids).decode(errors="replace") for ids in jaxpar["new_ids"]]
    assert jaxpar["time_to_first_token_s"] > 0 and jaxpar["tokens_per_s"] > 0

    assert main(["export-hf", str(run), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    ids = ",".join(str(b) for b in b"the ")
    hf = _json(capsys, ["generate", "--init-from-hf", str(tmp_path / "hf"), "--prompt-ids", ids,
                        "--prompt-ids", ",".join(str(b) for b in b"fox"), *argv])  # fmt: skip
    assert hf["new_ids"] == jaxpar["new_ids"]
    # Its own export as its draft model: the same greedy tokens, every draft kept.
    spec = _json(capsys, ["generate", "--run", str(run), "--prompt", "the ", "--prompt", "fox",
                          "--speculative", f"draft:{tmp_path / 'hf'}:3", *argv])  # fmt: skip
    assert spec["new_ids"] == jaxpar["new_ids"]
    assert spec["speculation"]["accepted"] == spec["speculation"]["drafted"] > 0
    other = json.loads((tmp_path / "hf" / "config.json").read_text()) | {"vocab_size": 300}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(other))
    assert main(["generate", "--run", str(run), "--prompt", "a", *argv, "--speculative",
                 f"draft:{tmp_path / 'hf'}:3"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "has a vocabulary of 300 tokens and the target 256" in err and len(err.splitlines()) == 1


def test_chat_answers_each_line_after_the_history_that_fits(capsys, run_dir, monkeypatch):
    run, _ = run_dir
    lines = iter(["hello", "again"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    new = 20  # of a context of 32: the history keeps the newest 12 tokens
    argv = ["--run", str(run), "--mesh", "data=8", "--max-new-tokens", str(new), "--greedy"]
    assert main(["chat", *argv]) == 0
    out, err = capsys.readouterr()
    assert "chatting with" in err

    # The same conversation by hand: each turn is a greedy generation after the window.
    keep, history, said = 32 - new, [], ""
    for line in ("hello", "again"):
        history = (history + list(f"{line}\n".encode()))[-keep:]
        ids = ",".join(map(str, history))
        reply = _json(capsys, ["generate", *argv, "--prompt-ids", ids, "--json"])["new_ids"][0]
        assert len(reply) == new
        said += codecs.getincrementaldecoder("utf-8")(errors="replace").decode(bytes(reply))
        said += "\n"
        history = (history + reply)[-keep:]
    assert len(history) == keep  # the window did cut the conversation
    assert out == said


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--prompt-ids", "1,2,999"], "holds id 999, outside the vocabulary [0, 256)"),
        (["--prompt", ""], "--prompt '' is empty"),
        (["--prompt-ids", "1,x"], "--prompt-ids '1,x' is not a comma-separated list of ids"),
        (["--prompt", "ab", "--max-new-tokens", "40"], "exceeds the model's context of 32"),
        (["--prompt", "ab", "--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
        (["--prompt", "ab", "--decode-steps", "0"], "--decode-steps 0 must be at least 1"),
        (
            ["--prompt", "ab", "--speculative", "ngram:0"],
            "--speculative 'ngram:0' must be ngram:K or draft:PATH:K",
        ),
        (
            ["--prompt", "ab", "--max-new-tokens", "4", "--speculative", "draft:/no/model:2"],
            "the draft model '/no/model' is neither a jaxpar run folder",
        ),
    ],
)
def test_generate_bad_input(capsys, run_dir, args, fragment):
    run, _ = run_dir
    assert main(["generate", "--run", str(run), "--mesh", "data=8", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxpar: error: ") and fragment in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["generate", "--init-from-hf", "no/such/dir", "--prompt", "a"], "is not a directory"),
        (["eval", "--run", ".", "--text", "no/such/file"], "--text 'no/such/file' does not exist"),
    ],
)
def test_missing_inputs(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("spec", [SPMD, CONTEXT])
def test_a_paged_cache_decodes_what_recomputation_gives(spec):
    # Each row's positions in scattered blocks of its data shard's pool: prompts prefilled as
    # pieces, every row's in one call, then decoded together, teacher-forced.
    gen, tokens, full = setup(spec, kv_blocks=24)
    data = gen.data
    per_row = MAX_LEN // 4
    table = np.random.default_rng(1).permutation(24)[: ROWS // data * per_row]
    table = np.tile(table.reshape(ROWS // data, per_row), (data, 1)).astype(np.int32)
    lengths = np.array([5, 8, 3, 16], np.int32)
    cache = gen.empty_cache()
    everyone = np.arange(ROWS)  # ROWS / data rows of each shard, in shard order
    piece = np.where(np.arange(16) < lengths[:, None], tokens[:, :16], 0)
    cache, logits, _ = gen.prefill_chunk(
        cache, piece, everyone % (ROWS // data), np.zeros(ROWS, np.int32), lengths,
        np.ones(ROWS, bool), RowSampling.fill(ROWS, GREEDY, 0), table,
    )  # fmt: skip
    np.testing.assert_allclose(logits, full[everyone, lengths - 1], rtol=0, atol=2e-5)
    position = lengths.copy()
    for _ in range(3):
        cache, logits, _ = gen.decode(cache, tokens[everyone, position], position,
                                      table_BN=table)  # fmt: skip
        np.testing.assert_allclose(logits[:, 0], full[everyone, position], rtol=0, atol=2e-5)
        position += 1
