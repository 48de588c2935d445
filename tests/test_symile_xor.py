"""data/symile_xor.py: Symile's XOR sampling (pairwise independent, jointly determined) and a
small build read back through TFDS and big_mm's source reader."""
import numpy as np
import tensorflow_datasets as tfds

from big_mm.input import sources
from data import symile_xor as sx

SIZES = {"train": 40, "val": 8, "test": 16}


def test_sampling_is_xor_with_independent_pairs():
  assert sx.bits_to_label(np.array([1, 0, 0, 0, 1])) == 17
  ex = [sx.example("train", i) for i in range(3000)]
  a, b, c = (np.stack([e[k] for e in ex]) for k in ("vec_a", "vec_b", "vec_c"))
  np.testing.assert_array_equal(c, np.logical_xor(a, b))
  assert all(e["is_xor"] == 1 for e in ex)
  for x in (a, b, c):
    assert np.all(np.abs(x.mean(0) - 0.5) < 0.04)
  for x, y in ((a, b), (a, c), (b, c)):  # Every pair agrees on half the bits: independent.
    assert np.all(np.abs((x == y).mean(0) - 0.5) < 0.04)
  assert [e["label"] for e in ex[:50]] == [sx.bits_to_label(v) for v in a[:50]]
  assert len({e["label"] for e in ex}) == 2 ** sx.DIM
  same = [sx.example("train", i, p_hat=0.0) for i in range(20)]  # The paper's p_hat = 0: c = a.
  assert all(np.array_equal(e["vec_c"], e["vec_a"]) and e["is_xor"] == 0 for e in same)
  firsts = {s: np.stack([sx.example(s, i)["vec_a"] for i in range(20)]) for s in sx.SPLITS}
  assert not np.array_equal(firsts["train"], firsts["val"])  # One rng stream per split.
  assert not np.array_equal(firsts["train"], firsts["test"])


def test_small_build_reads_back(tmp_path):
  builder = sx.build(str(tmp_path), sizes=SIZES)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == SIZES
  for split, n in SIZES.items():
    src = tfds.data_source("symile_xor", data_dir=str(tmp_path), split=split)
    reader = sources.open_source("symile_xor", split, str(tmp_path))
    records = sorted((src[k] for k in range(n)), key=lambda r: r["id"])
    assert [int(r["id"]) for r in records] == list(range(n)) and len(reader) == n
    for r in records:
      for k in ("vec_a", "vec_b", "vec_c"):
        assert r[k].dtype == np.float32 and r[k].shape == (sx.DIM,)
      np.testing.assert_array_equal(r["vec_c"], np.logical_xor(r["vec_a"], r["vec_b"]))
      want = sx.example(split, int(r["id"]))
      assert all(np.array_equal(r[k], want[k]) for k in want)
      assert (r["label"], r["label_b"], r["label_c"]) == tuple(
          sx.bits_to_label(r[k]) for k in ("vec_a", "vec_b", "vec_c"))
    np.testing.assert_array_equal(reader[0]["vec_c"], src[0]["vec_c"])
