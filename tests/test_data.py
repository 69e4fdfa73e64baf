"""`Corpus` (byte tokens from a glob), step-pure batches, and `global_batch` on a mesh."""

from __future__ import annotations

import sysconfig

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxpar.data import VOCAB, Corpus, expand_path, global_batch
from jaxpar.errors import JaxparError
from jaxpar.mesh import make_mesh, parse_mesh

TEXT_A = b"alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu\n" * 4
TEXT_B = bytes(range(256)) * 2  # every byte value, including the non-ASCII ones


@pytest.fixture
def tree(tmp_path):
    """a.txt and b.txt at the top, c.txt one level down, d.txt two levels down, plus a .md."""
    (tmp_path / "a.txt").write_bytes(TEXT_A)
    (tmp_path / "b.txt").write_bytes(TEXT_B)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "c.txt").write_bytes(b"ccc")
    (tmp_path / "sub" / "deeper" / "d.txt").write_bytes(b"dddd")
    (tmp_path / "notes.md").write_bytes(b"# notes\n")
    return tmp_path


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    rng = np.random.default_rng(123)
    return Corpus(tokens=rng.integers(0, 256, size=5000, dtype=np.uint8), files=1)


# --- Corpus.from_glob ----------------------------------------------------------------------------


def test_from_glob_reads_files_in_sorted_order(tree):
    corpus = Corpus.from_glob(str(tree / "*.txt"))
    assert corpus.files == 2
    assert corpus.tokens.dtype == np.uint8
    assert bytes(corpus.tokens) == TEXT_A + TEXT_B


def test_from_glob_recursive(tree):
    corpus = Corpus.from_glob(str(tree / "**" / "*.txt"))
    assert corpus.files == 4
    # sorted paths: a.txt, b.txt, sub/c.txt, sub/deeper/d.txt
    assert bytes(corpus.tokens) == TEXT_A + TEXT_B + b"ccc" + b"dddd"


def test_from_glob_skips_directories(tree):
    corpus = Corpus.from_glob(str(tree / "*"))
    # a.txt, b.txt, notes.md; the folder "sub" matches the glob but is not a file
    assert corpus.files == 3
    assert bytes(corpus.tokens) == TEXT_A + TEXT_B + b"# notes\n"


def test_stdlib_default_expands_and_finds_files():
    stdlib = sysconfig.get_paths()["stdlib"]
    assert expand_path("{stdlib}/*.py") == f"{stdlib}/*.py"
    corpus = Corpus.from_glob("{stdlib}/os.py")
    assert corpus.files == 1
    with open(f"{stdlib}/os.py", "rb") as f:
        assert bytes(corpus.tokens) == f.read()
    many = Corpus.from_glob("{stdlib}/*.py")
    assert many.files > 50
    assert len(many.tokens) > 1_000_000


def test_no_match_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "missing" / "*.txt")
    with pytest.raises(JaxparError) as e:
        Corpus.from_glob(pattern)
    assert f"data.path={pattern!r} matches no files" in str(e.value)


def test_only_directories_matching_is_no_match(tree):
    with pytest.raises(JaxparError, match=r"matches no files"):
        Corpus.from_glob(str(tree / "su*"))


def test_check_fits(tmp_path):
    (tmp_path / "short.txt").write_bytes(b"0123456789")  # 10 bytes
    corpus = Corpus.from_glob(str(tmp_path / "short.txt"))
    corpus.check_fits(9)  # exactly one window of 9 + 1 tokens
    for seq_len in (10, 100):
        with pytest.raises(JaxparError) as e:
            corpus.check_fits(seq_len)
        assert f"data.path holds 10 bytes, too few for train.seq_len={seq_len}" in str(e.value)


# --- batches -------------------------------------------------------------------------------------


def test_batch_is_pure_in_seed_and_step(corpus):
    a = corpus.batch(seed=0, step=3, batch=8, seq_len=32)
    b = corpus.batch(seed=0, step=3, batch=8, seq_len=32)
    np.testing.assert_array_equal(a, b)
    # a fresh Corpus object over the same tokens gives the same batch too (no hidden state)
    c = Corpus(tokens=corpus.tokens.copy(), files=1).batch(0, 3, 8, 32)
    np.testing.assert_array_equal(a, c)
    # asking for other steps in between does not change it
    corpus.batch(0, 4, 8, 32)
    np.testing.assert_array_equal(a, corpus.batch(0, 3, 8, 32))


def test_batch_differs_across_steps_and_seeds(corpus):
    a = corpus.batch(0, 3, 8, 32)
    assert not np.array_equal(a, corpus.batch(0, 4, 8, 32))
    assert not np.array_equal(a, corpus.batch(1, 3, 8, 32))


def test_batch_shape_dtype_and_range(corpus):
    b = corpus.batch(0, 0, 6, 20)
    assert b.shape == (6, 21)
    assert b.dtype == np.int32
    assert b.min() >= 0 and b.max() < VOCAB == 256


def _window_start(tokens: np.ndarray, row: np.ndarray) -> list[int]:
    n = len(row)
    return [s for s in range(len(tokens) - n + 1) if np.array_equal(tokens[s : s + n], row)]


def test_each_row_is_a_contiguous_window(corpus):
    b = corpus.batch(5, 7, 4, 16)
    for row in b:
        starts = _window_start(corpus.tokens.astype(np.int32), row)
        assert starts, "row is not a window of the corpus"


def test_rows_are_windows_of_a_text_corpus(tmp_path):
    text = bytes(range(200))  # all bytes distinct: the window start is unique
    (tmp_path / "t.bin").write_bytes(text)
    corpus = Corpus.from_glob(str(tmp_path / "t.bin"))
    b = corpus.batch(0, 0, 5, 10)
    for row in b:
        start = int(row[0])
        np.testing.assert_array_equal(row, np.arange(start, start + 11))


def test_batch_rows_subset_equals_rows_of_batch(corpus):
    full = corpus.batch(2, 9, 8, 24)
    for rows in ([0], [3, 5], [1, 2, 6, 7], list(range(8))):
        part = corpus.batch_rows(2, 9, 8, 24, np.array(rows))
        np.testing.assert_array_equal(part, full[rows])
        assert part.dtype == np.int32


# --- global_batch --------------------------------------------------------------------------------


def test_global_batch_on_data2_tensor4_mesh(corpus):
    mesh = make_mesh(parse_mesh("data=2,tensor=4"))
    sharding = NamedSharding(mesh, PartitionSpec("data", None))
    shape = (8, 33)
    arr = global_batch(corpus, 4, 11, shape, sharding)
    assert isinstance(arr, jax.Array)
    assert arr.shape == shape
    assert arr.dtype == np.int32
    assert arr.sharding == sharding
    expected = corpus.batch(4, 11, 8, 32)
    np.testing.assert_array_equal(np.asarray(arr), expected)
    # each device holds its data replica's half of the rows, whole rows
    for shard in arr.addressable_shards:
        assert shard.data.shape == (4, 33)
        np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])


def test_global_batch_replicated(corpus):
    mesh = make_mesh(parse_mesh("data=2,tensor=4"))
    sharding = NamedSharding(mesh, PartitionSpec())
    arr = global_batch(corpus, 0, 1, (4, 9), sharding)
    np.testing.assert_array_equal(np.asarray(arr), corpus.batch(0, 1, 4, 8))
    assert arr.sharding == sharding


def test_every_window_start_is_drawn_including_the_last(tmp_path):
    (tmp_path / "c.txt").write_bytes(bytes(range(12)))
    corpus = Corpus.from_glob(str(tmp_path / "c.txt"))
    firsts = {int(corpus.batch(0, step, 4, 10)[r, 0]) for step in range(100) for r in range(4)}
    assert firsts == {0, 1}  # windows of 11 tokens from 12: starts 0 and 1, so byte 11 is seen
