"""Converts tar shards or image-caption tables into an array_record TFDS dataset.

  python data/convert.py --input 'shards/{00000..00099}.tar' --name my_data --data_dir DIR
  python data/convert.py --input train='tar:/d/train-*.tar' --input test=/d/val.parquet \\
      --name my_data --data_dir DIR [--image_column jpg] [--text_column caption]
  python data/convert.py --index_only --input 'gs://b/shards/{00000..00099}.tar'

Inputs are big_mm source specs (big_mm/input/sources.py: tar:, parquet:, csv:, jsonl:,
or a path ending in one of those); `--input SPEC` fills the `train` split,
`--input SPLIT=SPEC` any other. The result has features image (the encoded bytes as
they were: JPEG/PNG/WebP), text and key (the record's tar key or `table:row`), in
source order, and opens by name: `--config.input.data=my_data --config.input.data_dir=DIR`.
Records without image or caption are skipped and counted. No TensorFlow needed (images
are written as the bytes they already are, as data/digits_captions.py does).

`--index_only` writes the tar index sidecars (`{shard}.index.json`) that let training
open big shard sets without scanning every tar header again.

Large conversions: `--beam_runner DirectRunner` (or any Beam runner, with
`--beam_options`) generates the examples with Apache Beam through TFDS, in chunks of
`--beam_chunk` records read in parallel (needs `pip install apache-beam`).
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

from big_mm.input import files, sources, webdataset  # pylint: disable=wrong-import-position
from big_mm.input.preprocess import BadRecord  # pylint: disable=wrong-import-position
from data import digits_captions  # pylint: disable=wrong-import-position

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _examples(spec: str, split: str, options: dict, start: int, stop: int, skipped=None):
  """Yields (index, example) of records [start, stop) of `split` of `spec`; bad records are
  counted in `skipped` (reason -> count) when given."""
  src = sources.open_source(spec, split, **options)
  for i in range(start, min(stop, len(src))):
    try:
      record = src[i]
    except BadRecord as e:
      reason, detail = e.reason, str(e)
    except Exception as e:  # pylint: disable=broad-except  An unreadable image file.
      reason, detail = "read", f"{type(e).__name__}: {e}"
    else:
      yield i, {"image": record["image"], "text": record["text"],
                "key": str(record.get("key", i))}
      continue
    if skipped is not None:
      if not skipped[reason]:
        logging.warning("Skipping record %d of %r: %s", i, spec, detail)
      skipped[reason] += 1


def builder_class(name: str, inputs: dict[str, str], *, image_column: str | None = None,
                  text_column: str | None = None, version: str = "1.0.0",
                  beam_chunk: int = 0):
  """A GeneratorBasedBuilder class named `name` writing `inputs` ({split: spec}).

  beam_chunk > 0: generate with Apache Beam, `beam_chunk` records per work item.
  """
  if not _NAME.match(name):
    raise ValueError(f"Dataset name {name!r} is not valid: use lower_snake_case, e.g. my_data.")
  builder_name = name
  options = {"image_column": image_column, "text_column": text_column}

  class Converted(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Image-caption pairs converted by data/convert.py."""

    name = builder_name
    VERSION = tfds.core.Version(version)
    RELEASE_NOTES = {version: "Converted by big_mm data/convert.py."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # See data/digits_captions.py.
      return epath.Path(__file__)

    def __init__(self, **kwargs):
      super().__init__(**kwargs)
      self.skipped = collections.Counter()

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"Converted from {inputs} by data/convert.py.",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(),
              "text": tfds.features.Text(),
              "key": tfds.features.Text(),
          }),
          disable_shuffling=True,  # Keep source order (bad records left out).
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # Everything is local (or fsspec) already.
      return {split: self._generate_examples(split, spec) for split, spec in inputs.items()}

    def _generate_examples(self, split, spec):
      if not beam_chunk:
        return _examples(spec, split, options, 0, sys.maxsize, self.skipped)
      import apache_beam as beam  # pylint: disable=g-import-not-at-top
      n = sources.num_examples(spec, split, **options)
      starts = list(range(0, n, beam_chunk))
      return (beam.Create(starts)
              | beam.FlatMap(lambda s: _examples(spec, split, options, s, s + beam_chunk)))

  return Converted


def convert(name: str, inputs: dict[str, str], data_dir: str | None, *, beam_runner=None,
            beam_options=None, beam_chunk: int = 10_000, **kwargs):
  """Builds the dataset; returns the prepared builder (with `.skipped` counts)."""
  cls = builder_class(name, inputs, beam_chunk=beam_chunk if beam_runner else 0, **kwargs)
  builder = cls(data_dir=data_dir, file_format="array_record")
  config = dict(try_download_gcs=False)
  if beam_runner:
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    config.update(beam_runner=beam_runner,
                  beam_options=beam.options.pipeline_options.PipelineOptions(
                      (beam_options or "").split()))
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**config))
  return builder


def parse_inputs(values: list[str]) -> dict[str, str]:
  """["SPEC", "test=SPEC2"] -> {"train": "SPEC", "test": "SPEC2"}."""
  out = {}
  for value in values:
    split, eq, spec = value.partition("=")
    if not eq or not re.match(r"^[a-z][a-z0-9_]*$", split):
      split, spec = "train", value
    if split in out:
      raise ValueError(f"Split {split!r} given twice in --input; use SPLIT=SPEC for others.")
    sources.parse_spec(spec)
    out[split] = spec
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--input", action="append", required=True,
                 help="[SPLIT=]SPEC: tar shards or a table (repeat for more splits)")
  p.add_argument("--name", help="name of the TFDS dataset to write (lower_snake_case)")
  p.add_argument("--data_dir", default=None,
                 help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--image_column", default=None)
  p.add_argument("--text_column", default=None)
  p.add_argument("--version", default="1.0.0")
  p.add_argument("--index_only", action="store_true",
                 help="only write the tar index sidecars of the --input shards")
  p.add_argument("--beam_runner", default=None, help="e.g. DirectRunner (needs apache-beam)")
  p.add_argument("--beam_options", default=None, help="Beam pipeline flags, space-separated")
  p.add_argument("--beam_chunk", type=int, default=10_000)
  args = p.parse_args(argv)
  try:
    inputs = parse_inputs(args.input)
  except ValueError as e:
    p.error(str(e))
  if args.index_only:
    for split, spec in inputs.items():
      kind, target = sources.parse_spec(spec)
      if kind != "tar":
        p.error(f"--index_only indexes tar shards; {spec!r} is {kind}.")
      written = webdataset.write_sidecars(files.expand(target, split=split, suffix=".tar"))
      print(f"{split}: wrote {len(written)} index files ({written[0]}, ...)")
    return 0
  if not args.name:
    p.error("--name is required (the TFDS dataset name to write).")
  builder = convert(args.name, inputs, args.data_dir, image_column=args.image_column,
                    text_column=args.text_column, version=args.version,
                    beam_runner=args.beam_runner, beam_options=args.beam_options,
                    beam_chunk=args.beam_chunk)
  print(f"{args.name}: {builder.data_dir}")
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples} examples")
  if builder.skipped:
    print(f"  skipped: {dict(builder.skipped)}")
  dir_flag = f" --config.input.data_dir={args.data_dir}" if args.data_dir else ""
  print(f"Train on it with --config.input.data={args.name}{dir_flag}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
