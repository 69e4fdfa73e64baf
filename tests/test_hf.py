"""Hugging Face Llama import and export: exact parameters, HF's forward math, errors.

The files here are written in Hugging Face's names and shapes by the tests themselves; the logits
are checked against an independent numpy transcription of transformers' LlamaModel, and against
transformers itself when it and torch are installed.
"""

import dataclasses
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jaxpar.checkpoint import Checkpointer
from jaxpar.cli import main
from jaxpar.config import Config, ModelConfig, dump_yaml
from jaxpar.errors import JaxparError
from jaxpar.infer.export import export_run
from jaxpar.interop.hf import export_hf, load_hf_params, load_tokenizer
from jaxpar.interop.hf_config import read_hf_config
from jaxpar.mesh import make_mesh, parse_mesh
from jaxpar.placement import Placement
from jaxpar.train.step import Trainer

# Distinct sizes, so a transposed or mis-split tensor cannot pass; 3 layers on 2 stages pad one.
L, D, N, K, F, V = 3, 32, 4, 2, 48, 40
H = D // N
SPMD = "data=2,pipeline=2,tensor=2"


def hf_doc(tied: bool = False, **extra) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": N,
        "num_key_value_heads": K,
        "vocab_size": V,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500.0,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        **extra,
    }


def hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face's names and [out, in] shapes."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    def norm() -> np.ndarray:
        return (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)

    out = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": norm()}
    if not tied:
        out["lm_head.weight"] = w(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": w(N * H, D),
            p + "self_attn.k_proj.weight": w(K * H, D),
            p + "self_attn.v_proj.weight": w(K * H, D),
            p + "self_attn.o_proj.weight": w(D, N * H),
            p + "post_attention_layernorm.weight": norm(),
            p + "mlp.gate_proj.weight": w(F, D),
            p + "mlp.up_proj.weight": w(F, D),
            p + "mlp.down_proj.weight": w(D, F),
        }
    return out


def write_hf(path: Path, doc: dict, weights: dict[str, np.ndarray], files: int = 1) -> Path:
    """A Hugging Face directory; with files > 1, shards and an index written by hand."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(doc))
    if files == 1:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        return path
    names = sorted(weights)
    weight_map = {}
    for k in range(files):
        file = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        part = {n: weights[n] for n in names[k::files]}
        save_file(part, path / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def mesh(spec: str) -> jax.sharding.Mesh:
    s = parse_mesh(spec)
    return make_mesh(s, jax.devices()[: s.size])


def trainer_for(model: ModelConfig, spec: str, fsdp: bool = False) -> Trainer:
    config = Config(model=model).replace(
        **{"parallel.mesh": spec, "parallel.fsdp": fsdp, "train.batch_size": 8}
    )
    return Trainer(Placement(config, mesh(spec)))


def flat(params) -> dict[str, jax.Array]:
    """'blocks/attn/wq_DNH' -> array, for Variables or plain arrays alike."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {
        "/".join(k.key for k in p if isinstance(k, jax.tree_util.DictKey)): x for p, x in leaves
    }


def expected_params(weights: dict[str, np.ndarray], trainer: Trainer) -> dict[str, np.ndarray]:
    """The mapping of the module docstring, written out independently, in the stage layout."""
    w = {n: np.asarray(x, np.float32) for n, x in weights.items()}
    out = {"embed_VD": w["model.embed_tokens.weight"], "final_norm/scale": w["model.norm.weight"]}
    if not trainer.placement.config.model.tie_embeddings:
        out["head_DV"] = w["lm_head.weight"].T
    per_layer = {}
    for i in range(L):
        p = f"model.layers.{i}."
        per_layer[i] = {
            "attn_norm/scale": w[p + "input_layernorm.weight"],
            "attn/wq_DNH": w[p + "self_attn.q_proj.weight"].T.reshape(D, N, H),
            "attn/wk_DKH": w[p + "self_attn.k_proj.weight"].T.reshape(D, K, H),
            "attn/wv_DKH": w[p + "self_attn.v_proj.weight"].T.reshape(D, K, H),
            "attn/wo_NHD": w[p + "self_attn.o_proj.weight"].T.reshape(N, H, D),
            "mlp_norm/scale": w[p + "post_attention_layernorm.weight"],
            "mlp/w_gate_DF": w[p + "mlp.gate_proj.weight"].T,
            "mlp/w_up_DF": w[p + "mlp.up_proj.weight"].T,
            "mlp/w_down_FD": w[p + "mlp.down_proj.weight"].T,
        }
    slot_layer = trainer.placement.layout.slot_layer
    for name, x in per_layer[0].items():
        stacked = np.zeros((*slot_layer.shape, *x.shape), np.float32)
        for (s, c), layer in np.ndenumerate(slot_layer):
            if layer >= 0:
                stacked[s, c] = per_layer[layer][name]
        out["blocks/" + name] = stacked
    return out


def assert_bits_equal(a: np.ndarray, b: np.ndarray, name: str) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype == np.float32, name
    assert a.shape == b.shape, (name, a.shape, b.shape)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), name


def assert_loaded(params, expected: dict[str, np.ndarray], trainer: Trainer) -> None:
    got, shardings = flat(params), flat(trainer.placement.param_shardings)
    assert sorted(got) == sorted(expected)
    for name, x in got.items():
        assert x.sharding == shardings[name], name
        assert_bits_equal(x, expected[name], name)


# -- config.json ---------------------------------------------------------------------------------


def test_read_config_maps_fields_and_hf_defaults(tmp_path):
    write_hf(tmp_path / "a", hf_doc(tied=True), {})
    model, context = read_hf_config(tmp_path / "a")
    assert context == 64
    assert model == ModelConfig(
        layers=L, dim=D, heads=N, kv_heads=K, mlp_dim=F, vocab=V,
        tie_embeddings=True, rope_theta=500.0, norm_eps=1e-5,
    )  # fmt: skip
    doc = {k: v for k, v in hf_doc().items() if k not in ("num_key_value_heads", "rope_theta")}
    del doc["tie_word_embeddings"]
    write_hf(tmp_path / "b", doc, {})
    model, _ = read_hf_config(tmp_path / "b")
    assert (model.kv_heads, model.rope_theta, model.tie_embeddings) == (N, 10000.0, False)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type='gpt2' is not a Llama model"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling="),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"head_dim": 16}, "head_dim=16 is not supported.*32 / 4"),
        ({"hidden_size": "32"}, "hidden_size must be an integer, got '32'"),
        ({"num_key_value_heads": 3}, "model.heads=4 must be a multiple of model.kv_heads=3"),
    ],
)
def test_read_config_refuses(tmp_path, change, message):
    write_hf(tmp_path / "m", hf_doc(**change), {})
    with pytest.raises(JaxparError, match=message):
        read_hf_config(tmp_path / "m")


def test_read_config_missing(tmp_path):
    with pytest.raises(JaxparError, match="nowhere.*does not exist"):
        read_hf_config(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(JaxparError, match="has no config.json"):
        read_hf_config(tmp_path / "empty")


# -- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, fsdp", [("data=1", False), (SPMD, False), ("data=4,tensor=2", True)]
)
@pytest.mark.parametrize("tied", [False, True])
def test_load_is_exact(tmp_path, spec, fsdp, tied):
    weights = hf_weights(tied)
    path = write_hf(tmp_path / "hf", hf_doc(tied), weights)
    model, _ = read_hf_config(path)
    trainer = trainer_for(model, spec, fsdp)
    params = load_hf_params(path, trainer.placement)
    if fsdp:  # the model dimension is split too, so every read takes a block of columns
        assert flat(params)["blocks/attn/wq_DNH"].sharding.spec[2] == "data"
    assert_loaded(params, expected_params(weights, trainer), trainer)
    if spec == SPMD:  # 3 layers on 2 stages: stage 1's second slot is padding
        assert trainer.placement.layout.slot_layer.tolist() == [[0, 1], [2, -1]]


def test_load_sharded_index_in_bfloat16(tmp_path):
    weights = {n: x.astype(ml_dtypes.bfloat16) for n, x in hf_weights(False).items()}
    path = write_hf(tmp_path / "hf", hf_doc(), weights, files=2)
    trainer = trainer_for(read_hf_config(path)[0], SPMD)
    params = load_hf_params(path, trainer.placement)
    upcast = {n: x.astype(np.float32) for n, x in weights.items()}
    assert_loaded(params, expected_params(upcast, trainer), trainer)


@pytest.mark.parametrize(
    "name, shape, message",
    [
        ("model.layers.1.self_attn.q_proj.weight", (D - 8, D),
         r"'model\.layers\.1\.self_attn\.q_proj\.weight' in .* has shape \(24, 32\), "
         r"expected \(32, 32\)"),
        ("lm_head.weight", None, r"'lm_head\.weight' is missing .* shape \(40, 32\)"),
        ("model.layers.2.mlp.down_proj.weight", None,
         r"'model\.layers\.2\.mlp\.down_proj\.weight' is missing"),
    ],
)  # fmt: skip
def test_load_refuses_bad_tensors(tmp_path, name, shape, message):
    weights = hf_weights(False)
    if shape is None:
        del weights[name]
    else:
        weights[name] = np.zeros(shape, np.float32)
    path = write_hf(tmp_path / "hf", hf_doc(), weights)
    trainer = trainer_for(read_hf_config(path)[0], "data=1")
    with pytest.raises(JaxparError, match=message):
        load_hf_params(path, trainer.placement)


def test_load_refuses_another_model(tmp_path):
    path = write_hf(tmp_path / "hf", hf_doc(), hf_weights(False))
    model = ModelConfig(layers=L, dim=D, heads=N, kv_heads=K, mlp_dim=F, vocab=V)
    with pytest.raises(JaxparError, match=r"model\.rope_theta=500\.0 there, 10000\.0 here"):
        load_hf_params(path, trainer_for(model, "data=1").placement)


# -- Hugging Face's forward math -----------------------------------------------------------------


def hf_llama_logits(w: dict[str, np.ndarray], doc: dict, tokens_BT: np.ndarray) -> np.ndarray:
    """transformers' LlamaForCausalLM forward, transcribed to numpy (float64), eager attention."""
    w = {n: np.asarray(x, np.float64) for n, x in w.items()}
    n, k = doc["num_attention_heads"], doc["num_key_value_heads"]
    h, eps = doc["hidden_size"] // n, doc["rms_norm_eps"]
    b, t = tokens_BT.shape

    def rms_norm(x, weight):
        return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))

    def rotate_half(x):
        x1, x2 = x[..., : h // 2], x[..., h // 2 :]
        return np.concatenate([-x2, x1], axis=-1)

    inv_freq = 1.0 / doc["rope_theta"] ** (np.arange(0, h, 2) / h)
    freqs = np.arange(t)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)  # (T, H)
    cos, sin = np.cos(emb), np.sin(emb)
    mask = np.triu(np.full((t, t), -np.inf), 1)

    x = w["model.embed_tokens.weight"][tokens_BT]
    for i in range(doc["num_hidden_layers"]):
        p = f"model.layers.{i}."
        hs = rms_norm(x, w[p + "input_layernorm.weight"])
        q = (hs @ w[p + "self_attn.q_proj.weight"].T).reshape(b, t, n, h).transpose(0, 2, 1, 3)
        kk = (hs @ w[p + "self_attn.k_proj.weight"].T).reshape(b, t, k, h).transpose(0, 2, 1, 3)
        v = (hs @ w[p + "self_attn.v_proj.weight"].T).reshape(b, t, k, h).transpose(0, 2, 1, 3)
        q, kk = q * cos + rotate_half(q) * sin, kk * cos + rotate_half(kk) * sin
        kk, v = np.repeat(kk, n // k, axis=1), np.repeat(v, n // k, axis=1)  # repeat_kv
        scores = q @ kk.transpose(0, 1, 3, 2) / np.sqrt(h) + mask
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, n * h)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        hs = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate = hs @ w[p + "mlp.gate_proj.weight"].T
        up = hs @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight" if doc["tie_word_embeddings"] else "lm_head.weight"]
    return x @ head.T


def jaxpar_logits(trainer: Trainer, params, tokens_BT: np.ndarray) -> np.ndarray:
    with jax.set_mesh(trainer.placement.mesh):
        logits = jax.jit(lambda p, x: nnx.merge(trainer.placement.graphdef, p)(x))(
            params, tokens_BT
        )
    return np.asarray(logits)


def test_logits_match_hf_llama_math(tmp_path):
    """Proves the mapping, the RoPE convention (no q/k permutation) and GQA's head grouping."""
    doc, weights = hf_doc(), hf_weights(False, seed=1)
    path = write_hf(tmp_path / "hf", doc, weights)
    trainer = trainer_for(read_hf_config(path)[0], "data=1")
    tokens = np.random.default_rng(2).integers(0, V, (2, 12)).astype(np.int32)
    got = jaxpar_logits(trainer, load_hf_params(path, trainer.placement), tokens)
    want = hf_llama_logits(weights, doc, tokens)
    assert np.abs(want).max() > 1  # not a vacuous comparison
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# -- export --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def initialised():
    """An untied model initialised by `init_state` on the 3-axis mesh (one compile, shared)."""
    model = ModelConfig(layers=L, dim=D, heads=N, kv_heads=K, mlp_dim=F, vocab=V)
    trainer = trainer_for(model, SPMD)
    return trainer, trainer.init_state()


@pytest.mark.parametrize("source, max_shard_bytes", [("init", 2**31), ("hf tied", 20_000)])
def test_export_then_import_is_bit_identical(tmp_path, initialised, source, max_shard_bytes):
    if source == "init":
        trainer, params = initialised[0], initialised[1].params
    else:
        path = write_hf(tmp_path / "src", hf_doc(tied=True), hf_weights(tied=True))
        trainer = trainer_for(read_hf_config(path)[0], SPMD)
        params = load_hf_params(path, trainer.placement)
    dest = tmp_path / "out" / "hf"
    export_hf(trainer.placement, params, dest, context=96, max_shard_bytes=max_shard_bytes)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["hf"]  # no temporary left
    weights = sorted(p.name for p in dest.glob("*.safetensors"))
    if source == "init":
        assert weights == ["model.safetensors"]
    else:
        assert len(weights) > 2 and weights[0] == f"model-00001-of-{len(weights):05d}.safetensors"
        index = json.loads((dest / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(weights)
        assert "lm_head.weight" not in index["weight_map"]
    doc = json.loads((dest / "config.json").read_text())
    assert doc["architectures"] == ["LlamaForCausalLM"] and doc["torch_dtype"] == "float32"
    assert read_hf_config(dest) == (trainer.placement.config.model, 96)
    loaded = load_hf_params(dest, trainer.placement)
    assert_loaded(loaded, {n: np.asarray(x) for n, x in flat(params).items()}, trainer)


def test_export_that_fails_leaves_nothing(tmp_path, initialised, monkeypatch):
    import jaxpar.interop.hf as hf

    written = []

    def save_then_fail(tensors, path, metadata):
        if written:
            raise OSError("disk full")
        written.append(path)
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", save_then_fail)
    trainer, params = initialised[0], initialised[1].params
    with pytest.raises(OSError, match="disk full"):
        export_hf(trainer.placement, params, tmp_path / "hf", context=8, max_shard_bytes=20_000)
    assert len(written) == 1 and list(tmp_path.iterdir()) == []


def test_export_refuses_a_used_destination(tmp_path, initialised):
    trainer, params = initialised[0], initialised[1].params
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(JaxparError, match="'.*taken' already exists and is not an empty"):
        export_hf(trainer.placement, params, tmp_path / "taken", context=8)
    (tmp_path / "empty").mkdir()
    export_hf(trainer.placement, params, tmp_path / "empty", context=8)
    files = sorted(p.name for p in (tmp_path / "empty").iterdir())
    assert files == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]
    other = trainer_for(dataclasses.replace(trainer.placement.config.model, layers=2), "data=1")
    with pytest.raises(JaxparError, match=r"blocks/attn/wk_DKH has shape \(2, 2, 32, 2, 8\), "
                       r"expected \(1, 2, 32, 2, 8\)"):  # fmt: skip
        export_hf(other.placement, params, tmp_path / "other", context=8)


def test_export_run_restores_the_newest_checkpoint_on_one_device(tmp_path, initialised):
    trainer, state = initialised
    # The run's pipeline settings do not fit one device; export_run must reset them.
    config = trainer.placement.config.replace(**{"train.seq_len": 24, "pipeline.microbatches": 2})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(config))
    newer = dataclasses.replace(state, params=jax.tree.map(lambda x: x * 2 + 1, state.params))
    checkpoints = Checkpointer(trainer.placement, run / "checkpoints", trainer.abstract_state())
    for step, saved in ((3, state), (7, newer)):
        checkpoints.save(step, saved, {"config": config.to_dict(), "mesh": SPMD})
    checkpoints.close()

    assert export_run(run, tmp_path / "hf") == tmp_path / "hf"
    assert read_hf_config(tmp_path / "hf") == (config.model, 24)
    one = trainer_for(config.model, "data=1")
    loaded = flat(load_hf_params(tmp_path / "hf", one.placement))
    slot_layer = trainer.placement.layout.slot_layer
    for name, x in flat(newer.params).items():
        x = np.asarray(x)
        if name.startswith("blocks/"):  # [P, v * c, ...] on 2 stages -> [1, L, ...]
            x = np.stack([x[tuple(np.argwhere(slot_layer == i)[0])] for i in range(L)])[None]
        assert_bits_equal(loaded[name], x, name)


def test_export_run_refuses(tmp_path):
    with pytest.raises(JaxparError, match="run directory '.*nowhere' does not exist"):
        export_run(tmp_path / "nowhere", tmp_path / "hf")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_yaml(Config()))
    with pytest.raises(JaxparError, match="holds no checkpoints"):
        export_run(run, tmp_path / "hf")
    (run / "checkpoints").mkdir()
    with pytest.raises(JaxparError, match="holds no checkpoint to export"):
        export_run(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_load_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert load_tokenizer(tmp_path) is None
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode("world hello there").ids == [1, 0, 2]


# -- transformers itself, when installed ---------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_llama_round_trip(tmp_path, tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # Eager attention on both sides, so the re-imported model runs the very same kernels.
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=N, num_key_value_heads=K, max_position_embeddings=64,
        rope_theta=500.0, tie_word_embeddings=tied, rms_norm_eps=1e-5,
        attn_implementation="eager",
    )  # fmt: skip
    hf_model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF's init (std 0.02, unit norms) gives tiny logits: use larger ones
        for p in hf_model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tokens = np.random.default_rng(3).integers(0, V, (2, 12)).astype(np.int32)
    with torch.no_grad():
        want = hf_model(torch.from_numpy(tokens).long()).logits.float().numpy()
    assert np.abs(want).max() > 1  # not a vacuous comparison

    model, _ = read_hf_config(tmp_path / "hf")
    trainer = trainer_for(model, "data=1")
    params = load_hf_params(tmp_path / "hf", trainer.placement)
    np.testing.assert_allclose(jaxpar_logits(trainer, params, tokens), want, rtol=1e-5, atol=1e-5)

    export_hf(trainer.placement, params, tmp_path / "back", context=64)
    again = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "back", attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        back = again(torch.from_numpy(tokens).long()).logits.float().numpy()
    np.testing.assert_array_equal(back, want)


def test_a_vocabulary_without_its_tokenizer_is_served_as_ids_only(tmp_path, capsys):
    # 300 ids and no tokenizer.json (a SentencePiece tokenizer.model only): ids past 255 are not
    # bytes, so every command that reads or writes text refuses, and --prompt-ids works.
    weights = hf_weights(False)
    rng = np.random.default_rng(1)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = rng.standard_normal((300, D)).astype(np.float32)
    path = write_hf(tmp_path / "hf", hf_doc(vocab_size=300), weights)
    (path / "tokenizer.model").write_bytes(b"")
    (tmp_path / "text.txt").write_text("hello")
    model = ["--init-from-hf", str(path), "--mesh", "data=8"]
    for argv in (["serve", *model, "--port", "0"], ["chat", *model],
                 ["generate", *model, "--prompt", "hi"],
                 ["eval", *model, "--text", str(tmp_path / "text.txt")]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and (
            f"--init-from-hf '{path}' has no tokenizer.json for its 300-token vocabulary (its "
            "tokenizer.model, a SentencePiece model, is not read" in err
        ), err
    argv = ["generate", *model, "--prompt-ids", "1,299", "--max-new-tokens", "2", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["new_ids"][0]) == 2 and out["text"] is None
