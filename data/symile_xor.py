"""`symile_xor`: Symile's synthetic binary XOR data (Saporta et al., NeurIPS 2024, section 5.1).

The paper's sampling procedure (rajesh-lab/symile@26e6c33 experiments/README.md, "Synthetic
data experiments"; experiments/datasets.py@0cb77ab BinaryXORDataset):
  a_j, b_j ~ Bernoulli(0.5) i.i.d., i ~ Bernoulli(p_hat) per sample,
  c_j = (a_j XOR b_j)^i * a_j^(1 - i),  j = 1..d
with d = 5 and 10,000 / 1,000 / 5,000 train / val / test samples
(experiments/bash_scripts/binary_xor/main.sbatch@7cd88e3). The paper sweeps p_hat over
{0, 0.1, ..., 1}; this dataset is p_hat = 1 (P_HAT): c = a XOR b exactly, so every pair of
(a, b, c) is independent and only all three together carry information (total correlation
d bits), the case where pairwise CLIP stays at chance and Symile does not.

Fields: vec_a, vec_b, vec_c (float32 [d] of 0/1: the modalities "vec_a", "vec_b", "vec_c" of
big_mm/modalities.py), label (a as a binary number, a_1 the most significant bit: the paper's
zero-shot target, which of the 2^d vectors is a given b and c,
experiments/models/binary_xor_8_model.py@7cd88e3), label_b, label_c (b, c likewise), is_xor
(i), id. Each record is a pure function of (seed, split, id). Tiny records: the whole
dataset trains in seconds on a CPU. Build with `python data/build_demo.py --binding` or
`build(data_dir)`.
"""
from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data import digits_captions

SEED = 0
DIM = 5
P_HAT = 1.0
SPLITS = {"train": 10_000, "val": 1_000, "test": 5_000}


def bits_to_label(bits: np.ndarray) -> int:
  """0/1 vector -> the integer it spells, first bit most significant."""
  return int(np.asarray(bits, np.int64) @ (1 << np.arange(len(bits) - 1, -1, -1)))


def example(split: str, index: int, seed: int = SEED, dim: int = DIM, p_hat: float = P_HAT):
  """Record `index` of `split` (the paper's sampling procedure, one draw per record)."""
  rng = np.random.default_rng([seed, list(SPLITS).index(split), index])
  a = (rng.random(dim) < 0.5).astype(np.int64)
  b = (rng.random(dim) < 0.5).astype(np.int64)
  i = int(rng.random() < p_hat)
  c = np.bitwise_xor(a, b) if i else a
  return {"vec_a": a.astype(np.float32), "vec_b": b.astype(np.float32),
          "vec_c": c.astype(np.float32), "label": bits_to_label(a), "label_b": bits_to_label(b),
          "label_c": bits_to_label(c), "is_xor": i, "id": index}


class SymileXor(tfds.core.GeneratorBasedBuilder):
  """Symile's binary XOR synthetic data: c = a XOR b."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (d = 5, p_hat = 1)."}

  def __init__(self, *, sizes: dict[str, int] | None = None, **kwargs):
    self.sizes = sizes or SPLITS
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    vec = tfds.features.Tensor(shape=(DIM,), dtype=np.float32)
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "vec_a": vec, "vec_b": vec, "vec_c": vec, "label": np.int32, "label_b": np.int32,
            "label_c": np.int32, "is_xor": np.int32, "id": np.int32}),
        homepage="https://github.com/rajesh-lab/symile")

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: drawn from a seeded rng.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    for index in range(self.sizes[split]):
      yield index, example(split, index)


def build(data_dir: str | None = None, sizes: dict[str, int] | None = None
          ) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns symile_xor; sizes: {split: n}, a small build (tests)."""
  builder = SymileXor(data_dir=data_dir, file_format="array_record", sizes=sizes)
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
