"""`digits_multicaption`: the digits_captions training images with several captions each, as
one parquet table (for configs/demo_multipos.py, multi-positive contrastive training).

  python data/digits_multicaption.py [--out PATH]

Default PATH: `$TFDS_DATA_DIR` (or ~/tensorflow_datasets) /digits_multicaption/train.parquet.
Rows: the 1,497 `train` images of digits_captions (same ids, same PNGs), columns
  image     PNG bytes
  captions  list of CAPTIONS_PER_IMAGE different captions, from digits_captions'
            CAPTION_TEMPLATES (never its HELD_OUT_TEMPLATES, the zero-shot prompts)
  paragraph the same captions as one text, sentences ending in "." (a "long caption":
            longer than the demo's 16 tokens, for input.split_long_captions)
  label     0-9
Deterministic: the templates of image i are drawn from a generator seeded by (SEED, i).
The held-out `test` split stays digits_captions' (TFDS), which the demo's evaluators read.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

CAPTIONS_PER_IMAGE = 3
SEED = 1


def default_path() -> str:
  data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  return os.path.join(data_dir, "digits_multicaption", "train.parquet")


def captions(label: int, example_id: int) -> list[str]:
  """CAPTIONS_PER_IMAGE different captions of example `example_id`."""
  from data import digits_captions  # pylint: disable=g-import-not-at-top  (tfds: a slow import)
  rng = np.random.default_rng([SEED, example_id])
  templates = rng.choice(len(digits_captions.CAPTION_TEMPLATES), CAPTIONS_PER_IMAGE,
                         replace=False)
  return [digits_captions.CAPTION_TEMPLATES[int(t)].format(
      w=digits_captions.WORDS[label], n=str(label)) for t in templates]


def build(path: str | None = None) -> str:
  """Writes the table (if absent) and returns its path."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  from data import digits_captions  # pylint: disable=g-import-not-at-top
  path = path or default_path()
  if os.path.exists(path):
    return path
  images, labels = digits_captions.load_digits()
  train, _ = digits_captions.split_ids(labels)
  rows = {"image": [], "captions": [], "paragraph": [], "label": []}
  for i in train:
    i, label = int(i), int(labels[i])
    caps = captions(label, i)
    rows["image"].append(digits_captions.to_png(images[i]))
    rows["captions"].append(caps)
    rows["paragraph"].append(" ".join(f"{c}." for c in caps))
    rows["label"].append(label)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  pq.write_table(pa.table(rows), tmp)
  os.replace(tmp, path)
  return path


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=None, help=f"parquet path (default {default_path()})")
  args = p.parse_args(argv)
  print(build(args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
