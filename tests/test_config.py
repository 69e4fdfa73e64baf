"""`load_config`, `validate`, `validate_for_mesh`, `Config.replace` and `dump_yaml`."""

from __future__ import annotations

import dataclasses

import pytest

from jaxpar.config import (
    Config,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    dump_yaml,
    load_config,
    validate_for_mesh,
)
from jaxpar.errors import JaxparError
from jaxpar.mesh import MeshSpec


def _write(tmp_path, text: str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- defaults, files and overrides -------------------------------------------------------------


def test_defaults_equal_the_dataclass_defaults():
    config = load_config()
    assert config == Config()
    assert config.model == ModelConfig()
    assert config.train == TrainConfig()
    assert config.data == DataConfig()
    assert config.parallel == ParallelConfig()
    # a few concrete defaults the CLI documents
    assert config.parallel.mesh == "data=2,tensor=4"
    assert config.parallel.fsdp is False
    assert config.train.steps == 150
    assert config.train.dtype == "auto"
    assert config.data.path == "{stdlib}/*.py"


def test_none_path_and_empty_overrides_give_defaults():
    assert load_config(None, []) == Config()


def test_yaml_file_and_overrides_override_wins(tmp_path):
    path = _write(
        tmp_path,
        "model:\n  layers: 2\n  dim: 64\ntrain:\n  steps: 7\n  lr: 0.01\n"
        "parallel:\n  mesh: tensor=8\n  fsdp: true\n",
    )
    config = load_config(path, ["train.steps=9", "model.layers = 3", "data.path=/x/*.txt"])
    assert config.train.steps == 9  # override beats the file
    assert config.model.layers == 3  # spaces around key and value are tolerated
    assert config.model.dim == 64  # from the file
    assert config.train.lr == 0.01
    assert config.parallel.mesh == "tensor=8"
    assert config.parallel.fsdp is True
    assert config.data.path == "/x/*.txt"
    # everything else keeps its default
    assert config.model.heads == ModelConfig().heads
    assert config.train.batch_size == TrainConfig().batch_size


def test_later_override_wins_over_earlier(tmp_path):
    config = load_config(None, ["train.steps=5", "train.steps=6"])
    assert config.train.steps == 6


def test_override_value_types_are_coerced():
    config = load_config(
        None,
        ["train.lr=1e-3", "train.seed=42", "parallel.fsdp=yes", "model.tie_embeddings=true"],
    )
    assert config.train.lr == pytest.approx(1e-3) and isinstance(config.train.lr, float)
    assert config.train.seed == 42 and isinstance(config.train.seed, int)
    assert config.parallel.fsdp is True
    assert config.model.tie_embeddings is True
    assert load_config(None, ["parallel.fsdp=off"]).parallel.fsdp is False


def test_int_in_yaml_accepted_for_float_field(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 1\n  grad_clip: 2\n")
    config = load_config(path)
    assert config.train.lr == 1.0 and type(config.train.lr) is float
    assert config.train.grad_clip == 2.0 and type(config.train.grad_clip) is float


def test_bool_in_yaml_rejected_for_int_field(tmp_path):
    path = _write(tmp_path, "train:\n  steps: true\n")
    with pytest.raises(JaxparError, match=r"'train.steps' must be an integer, got True"):
        load_config(path)


def test_bool_in_yaml_rejected_for_float_field(tmp_path):
    path = _write(tmp_path, "train:\n  lr: false\n")
    with pytest.raises(JaxparError, match=r"'train.lr' must be a number, got False"):
        load_config(path)


def test_float_in_yaml_rejected_for_int_field(tmp_path):
    path = _write(tmp_path, "train:\n  steps: 5.5\n")
    with pytest.raises(JaxparError, match=r"'train.steps' must be an integer, got 5.5"):
        load_config(path)


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()


# --- errors --------------------------------------------------------------------------------------


def test_unknown_key_in_known_section():
    with pytest.raises(JaxparError) as e:
        load_config(None, ["train.step=5"])
    msg = str(e.value)
    assert "unknown config key 'train.step'" in msg
    assert "steps" in msg  # lists the valid keys


def test_unknown_key_in_yaml(tmp_path):
    path = _write(tmp_path, "model:\n  depth: 3\n")
    with pytest.raises(JaxparError, match=r"unknown config key 'model.depth'"):
        load_config(path)


def test_unknown_section_override():
    with pytest.raises(JaxparError) as e:
        load_config(None, ["optim.lr=1"])
    assert "unknown config key 'optim.lr'" in str(e.value)
    assert "model, train, data, parallel" in str(e.value)


def test_key_without_name_is_unknown():
    with pytest.raises(JaxparError, match=r"unknown config key 'model'"):
        load_config(None, ["model=5"])


def test_unknown_section_in_yaml(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: 1\n")
    with pytest.raises(JaxparError) as e:
        load_config(path)
    assert "unknown config section 'optim'" in str(e.value)
    assert str(path) in str(e.value)


def test_section_that_is_not_a_mapping(tmp_path):
    path = _write(tmp_path, "train: 5\n")
    with pytest.raises(JaxparError, match=r"config section 'train' must be a mapping, got 5"):
        load_config(path)


def test_override_without_equals():
    with pytest.raises(
        JaxparError, match=r"override 'train.steps' must look like SECTION.NAME=VALUE"
    ):
        load_config(None, ["train.steps"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.steps=abc", "config key 'train.steps' must be an integer, got 'abc'"),
        ("train.steps=1.5", "config key 'train.steps' must be an integer, got '1.5'"),
        ("train.lr=fast", "config key 'train.lr' must be a number, got 'fast'"),
        ("parallel.fsdp=maybe", "config key 'parallel.fsdp' must be true or false, got 'maybe'"),
    ],
)
def test_bad_value_type(override, fragment):
    with pytest.raises(JaxparError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_wrong_type_in_yaml_for_string_field(tmp_path):
    path = _write(tmp_path, "data:\n  path: 5\n")
    with pytest.raises(JaxparError, match=r"config key 'data.path' must be a string, got 5"):
        load_config(path)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(JaxparError) as e:
        load_config(missing)
    assert f"config file '{missing}' does not exist" in str(e.value)


def test_malformed_yaml_file(tmp_path):
    path = _write(tmp_path, "model:\n  layers: [1, 2\n  dim: 3\n")
    with pytest.raises(JaxparError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"config file '{path}' is not valid YAML" in msg
    assert "at line" in msg


def test_yaml_that_is_a_list(tmp_path):
    path = _write(tmp_path, "- model\n- train\n")
    with pytest.raises(JaxparError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "must hold a mapping of sections" in msg
    assert "got list" in msg


@pytest.mark.parametrize("steps", ["0", "-1"])
def test_non_positive_steps(steps):
    with pytest.raises(JaxparError) as e:
        load_config(None, [f"train.steps={steps}"])
    assert f"config key 'train.steps' must be positive, got {int(steps)}" in str(e.value)


@pytest.mark.parametrize(("lr", "shown"), [("0", "0.0"), ("-1", "-1.0"), ("-0.5", "-0.5")])
def test_non_positive_lr(lr, shown):
    with pytest.raises(JaxparError) as e:
        load_config(None, [f"train.lr={lr}"])
    assert f"config key 'train.lr' must be positive, got {shown}" in str(e.value)


def test_non_positive_lr_from_yaml(tmp_path):
    with pytest.raises(JaxparError, match=r"'train.lr' must be positive, got 0.0"):
        load_config(_write(tmp_path, "train:\n  lr: 0\n"))


def test_heads_not_divisible_by_kv_heads():
    with pytest.raises(JaxparError) as e:
        load_config(None, ["model.heads=8", "model.kv_heads=3"])
    assert "model.heads=8 must be a multiple of model.kv_heads=3" in str(e.value)


def test_dim_not_divisible_by_heads():
    with pytest.raises(JaxparError) as e:
        load_config(None, ["model.dim=100", "model.heads=8"])
    assert "model.dim=100 must be divisible by model.heads=8" in str(e.value)


def test_odd_head_dim_rejected():
    with pytest.raises(JaxparError, match=r"head_dim = model.dim / model.heads = 3 must be even"):
        load_config(None, ["model.dim=24", "model.heads=8", "model.kv_heads=4"])


def test_bad_dtype_rejected():
    with pytest.raises(JaxparError, match=r"train.dtype='float8' is not one of auto, float32"):
        load_config(None, ["train.dtype=float8"])


# --- validate_for_mesh ---------------------------------------------------------------------------


def _cfg(*overrides: str) -> Config:
    return load_config(None, list(overrides))


def test_validate_for_mesh_accepts_the_defaults():
    validate_for_mesh(Config(), MeshSpec(data=2, pipeline=1, tensor=4))
    validate_for_mesh(Config(), MeshSpec(data=8, pipeline=1, tensor=1))
    validate_for_mesh(Config(), MeshSpec(data=4, pipeline=1, tensor=2))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            ("model.dim=96", "model.heads=6", "model.kv_heads=6"),
            "model.heads=6 is not divisible by tensor=4",
        ),
        (("model.heads=8", "model.kv_heads=2"), "model.kv_heads=2 is not divisible by tensor=4"),
        (("model.mlp_dim=30",), "model.mlp_dim=30 is not divisible by tensor=4"),
        (("model.vocab=250",), "model.vocab=250 is not divisible by tensor=4"),
    ],
)
def test_validate_for_mesh_tensor_divisibility(overrides, fragment):
    config = _cfg(*overrides)
    with pytest.raises(JaxparError) as e:
        validate_for_mesh(config, MeshSpec(data=2, pipeline=1, tensor=4))
    assert fragment in str(e.value)


def test_validate_for_mesh_suggests_divisors():
    with pytest.raises(JaxparError) as e:
        validate_for_mesh(_cfg("model.mlp_dim=30"), MeshSpec(data=2, pipeline=1, tensor=4))
    assert "(1, 2, 3, 5, 6, 10, 15, 30)" in str(e.value)


def test_validate_for_mesh_batch_not_divisible_by_data():
    with pytest.raises(JaxparError) as e:
        validate_for_mesh(_cfg("train.batch_size=3"), MeshSpec(data=2, pipeline=1, tensor=4))
    assert "train.batch_size=3 is not divisible by data=2" in str(e.value)


def test_validate_for_mesh_fsdp_needs_dim_divisible_by_data():
    config = _cfg("parallel.fsdp=true", "model.dim=48", "model.heads=4", "model.kv_heads=4")
    validate_for_mesh(config, MeshSpec(data=4, pipeline=1, tensor=2))  # 48 % 4 == 0: fine
    # the default batch 16 is not divisible by 5; use one that is, so only FSDP is at fault
    config = config.replace(**{"train.batch_size": 10})
    with pytest.raises(JaxparError) as e:
        validate_for_mesh(config, MeshSpec(data=5, pipeline=1, tensor=1))
    assert "model.dim=48 is not divisible by data=5" in str(e.value)
    assert "FSDP" in str(e.value)
    # without fsdp the same sizes are fine
    validate_for_mesh(
        config.replace(**{"parallel.fsdp": False}), MeshSpec(data=5, pipeline=1, tensor=1)
    )


def test_validate_for_mesh_accepts_pipelines_and_checks_their_sizes():
    validate_for_mesh(Config(), MeshSpec(data=2, pipeline=2, tensor=2))
    deep = Config().replace(**{"model.layers": 8, "pipeline.schedule": "circular",
                               "pipeline.repeats": 2, "pipeline.microbatches": 4})  # fmt: skip
    validate_for_mesh(deep, MeshSpec(data=2, pipeline=2, tensor=2))
    with pytest.raises(JaxparError, match=r"fewer than pipeline stages x repeats = 4 x 2 = 8"):
        validate_for_mesh(
            deep.replace(**{"model.layers": 6}), MeshSpec(data=1, pipeline=4, tensor=2)
        )
    with pytest.raises(JaxparError, match=r"is not divisible by pipeline stages = 4"):
        validate_for_mesh(
            Config().replace(**{"train.batch_size": 6}), MeshSpec(data=1, pipeline=4, tensor=2)
        )


# --- replace and YAML round-trip -----------------------------------------------------------------


def test_replace_round_trip():
    config = Config()
    changed = config.replace(
        **{"train.steps": 5, "train.lr": 0.5, "parallel.fsdp": True, "parallel.mesh": "tensor=8"}
    )
    assert changed.train.steps == 5
    assert changed.train.lr == 0.5
    assert changed.parallel.fsdp is True
    assert changed.parallel.mesh == "tensor=8"
    assert config == Config()  # the original is untouched (frozen)
    # only the named fields changed
    assert changed.model == config.model
    assert dataclasses.replace(changed.train, steps=150, lr=3e-3) == config.train
    back = changed.replace(
        **{
            "train.steps": 150,
            "train.lr": 3e-3,
            "parallel.fsdp": False,
            "parallel.mesh": "data=2,tensor=4",
        }
    )
    assert back == config


def test_replace_keeps_non_default_base():
    base = load_config(None, ["model.layers=2", "train.seed=7"])
    changed = base.replace(**{"train.steps": 11})
    assert changed.model.layers == 2
    assert changed.train.seed == 7
    assert changed.train.steps == 11


def test_replace_is_typed():
    """Values are set as given (never printed and parsed back) and type-checked as YAML's are."""
    config = Config().replace(
        **{"train.sample_prompt": " x=1, y ", "train.lr": 1, "pipeline.remat": "full"}
    )
    assert config.train.sample_prompt == " x=1, y " and config.train.lr == 1.0
    assert config.model.remat == "full"  # the old name of the key still works
    with pytest.raises(JaxparError, match=r"'train.steps' must be an integer, got '5'"):
        Config().replace(**{"train.steps": "5"})
    with pytest.raises(JaxparError, match=r"'parallel.fsdp' must be true or false, got 1"):
        Config().replace(**{"parallel.fsdp": 1})


def test_replace_validates():
    with pytest.raises(JaxparError, match=r"'train.steps' must be positive, got 0"):
        Config().replace(**{"train.steps": 0})
    with pytest.raises(JaxparError, match=r"unknown config key 'train.nope'"):
        Config().replace(**{"train.nope": 1})


def test_dump_yaml_then_load_gives_equal_config(tmp_path):
    config = load_config(
        None,
        [
            "model.layers=2",
            "model.dim=64",
            "model.tie_embeddings=true",
            "train.lr=0.0125",
            "train.dtype=bfloat16",
            "data.path=/tmp/some dir/*.txt",
            "parallel.mesh=data=2,pipeline=1,tensor=4",
            "parallel.fsdp=true",
        ],
    )
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_yaml(config))
    assert load_config(path) == config
    # the default config round-trips as well, including the trailing space of the prompt
    path.write_text(dump_yaml(Config()))
    loaded = load_config(path)
    assert loaded == Config()
    assert loaded.train.sample_prompt == "def "


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("train.lr=nan", "'train.lr' must be positive, got nan"),
        ("train.lr=inf", "'train.lr' must be positive, got inf"),
        ("train.grad_clip=nan", "'train.grad_clip' must be positive"),
        ("model.norm_eps=inf", "'model.norm_eps' must be positive"),
        ("train.b1=1", "'train.b1' must be in [0, 1), got 1.0"),
        ("train.b2=-0.1", "'train.b2' must be in [0, 1)"),
        ("train.weight_decay=-5", "'train.weight_decay' must be >= 0, got -5.0"),
    ],
)
def test_non_finite_and_out_of_range_values_are_rejected(override, fragment):
    with pytest.raises(JaxparError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_string_overrides_keep_their_spaces():
    assert load_config(None, ["train.sample_prompt=def "]).train.sample_prompt == "def "
