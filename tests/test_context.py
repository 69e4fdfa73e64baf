"""Long context: the sequence split over the `context` mesh axis, for training.

Every case's loss and gradients equal the plain sequential model's on one device (float32,
relative 1e-5; `pipeline_cases`): ring and all-gather attention, with and without causal load
balancing, blocked within a device, composed with data, tensor, FSDP, pipeline stages (gpipe and
a hand-backward schedule) and recomputation. The model has 4 query heads over 2 kv heads (GQA);
the sequence of 16 tokens is 4 chunks of 4 on context=2 and 8 chunks of 2 on context=4.
"""

import numpy as np
import pytest
from pipeline_cases import assert_matches_sequential, gpipe, one_f, trainer

from jaxpar.cli import main
from jaxpar.model.context import sequence_order

LAYERS = 8  # as test_pipeline's cases: the sequential reference is one compile for both
ALL_GATHER = "model.context_attention=all_gather"
UNBALANCED = "model.context_load_balance=false"
CASES = [
    ("context=2", ()),
    ("context=4", (ALL_GATHER,)),
    ("context=4", (UNBALANCED, "model.attention_block=2")),  # the ring's blocks, blocked again
    ("data=2,context=2,tensor=2", ("model.remat=full",)),
    ("data=2,context=2,tensor=2", (ALL_GATHER, "parallel.fsdp=true")),
    ("pipeline=2,context=2,tensor=2", one_f(2)),
    ("pipeline=2,context=2,tensor=2", (*gpipe(2), ALL_GATHER)),
    # no context axis: blocked attention alone (4 blocks of 4 queries, causal blocks skipped)
    ("data=1", ("model.attention_block=4",)),
]  # fmt: skip


@pytest.mark.parametrize(("mesh_spec", "extra"), CASES)
def test_split_sequence_equals_sequential_model(mesh_spec, extra):
    assert_matches_sequential(mesh_spec, LAYERS, extra)


def test_load_balanced_order():
    """MaxText's example: on context=2, tokens 0, 1, 6, 7 on one piece and 2, 3, 4, 5 on the
    other; every piece's positions sum to the same (the same causal work)."""
    assert sequence_order(8, 2, balanced=True).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert sequence_order(8, 2, balanced=False).tolist() == list(range(8))
    pieces = sequence_order(64, 4, balanced=True).reshape(4, -1)
    assert sorted(pieces.flatten().tolist()) == list(range(64))
    assert len({int(p.sum()) for p in pieces}) == 1
    assert len({int(p.sum()) for p in np.arange(64).reshape(4, -1)}) == 4


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--mesh", "context=4,data=2", "train.seq_len=12"],
         "train.seq_len=12 is not divisible by 2 x context = 8"),
        (["--mesh", "context=2", "model.context_attention=ulysses"],
         "model.context_attention='ulysses' is not one of ring, all_gather"),
        (["--mesh", "context=2,tensor=4", "model.heads=6", "model.kv_heads=2", "model.dim=48"],
         "model.heads=6 is not divisible by tensor=4"),
        (["model.attention_block=-1"], "'model.attention_block' must be >= 0"),
    ],
)  # fmt: skip
def test_bad_context_input_exits_2_with_one_line(capsys, tmp_path, args, fragment):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("jaxpar: error: ") and fragment in err, err
    assert not out.exists()


def test_bfloat16_all_gather_step_compiles():
    """The gather moves as an all-to-all of copies: the all-gather's transpose, a bfloat16
    reduce-scatter in a program that leaves `tensor` automatic, aborts XLA:CPU's compiler."""
    extra = (ALL_GATHER, "train.dtype=bfloat16")
    trainer("data=2,context=2,tensor=2", LAYERS, extra).compile()
