r"""Pre-tokenizes a multimodal TFDS dataset with trained vq_tokenizer runs (4M's inputs).

Usage:
  python tools/tokenize_dataset.py --data multimodal_scenes --data_dir DIR \
      --tokenizer rgb=/tmp/4m_tok_rgb --tokenizer depth=/tmp/4m_tok_depth \
      --tokenizer semseg=/tmp/4m_tok_semseg [--out_name multimodal_scenes_tokens] \
      [--batch 256] [--splits train,test] [--step N]

Writes the TFDS dataset --out_name (array_record, TF-free like data/scenes.py) into the same
data dir: every feature of --data with its type and values unchanged, in the source's record
order, plus "tok_<m>" Tensor int32 [N] for each tokenizer (N = its grid's h * w, the code grid
row-major; modalities tok_rgb / tok_depth / tok_semseg of big_mm/modalities.py). Records whose
field does not decode, or has another size than the feature's fixed shape (else the first
record's), are dropped and counted (wrong_size). The dataset's description names
the tokenizer runs (workdir, step, grid, vocab) that produced it. Train on it with
`--config.input.data=multimodal_scenes_tokens --config.input.modalities="('tok_rgb', ...)"`.

Flags:
  --data       a prepared TFDS dataset (a name, as input.data takes it)
  --data_dir   its TFDS data dir (default: TFDS's); the output goes there too
  --tokenizer  MODALITY=WORKDIR, MODALITY one of rgb (reads the "image" feature, uint8 ->
               float32 [-1, 1]), depth ("depth", float metres), semseg ("semseg", int ids);
               WORKDIR a trained vq_tokenizer run (big_mm.models.vq.load). Repeat the flag or
               separate several with commas.
  --step       the checkpoint step of every tokenizer (default: each run's newest)
  --out_name   the new dataset's name (default: DATA_tokens)
  --splits     comma-separated splits to write (default: every split of --data)
  --batch      examples per encode call (default 256)
  --debug      shows the traceback of a user error too
Progress goes to stderr; the summary gives examples/s per split and, per modality, the codes
used (of the vocabulary) and the codes' perplexity (exp of the entropy of their histogram).
An existing --out_name dataset is not overwritten: delete its directory first.
"""
from __future__ import annotations

import collections
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from etils import epath
import numpy as np

from big_mm import cli
from big_mm import config as config_lib
from big_mm.input import dense
from big_mm.input import preprocess
from big_mm.input import sources
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = ("data", "data_dir", "tokenizer", "step", "out_name", "splits", "batch")
OUT_VERSION = "1.0.0"
# Each tokenizer modality: the source feature it encodes.
FIELDS = {"rgb": "image", "depth": "depth", "semseg": "semseg"}
_RGB_OPS = preprocess.parse_pp("decode|value_range(-1,1)")  # What the trainer's pp gives.


def _decode(modality: str, value) -> np.ndarray:
  """A record's value -> the tokenizer's input for one example (BadRecord when it does not
  decode): rgb float32 [H, W, 3] in [-1, 1], depth float32 [H, W] metres, semseg int32."""
  if modality == "rgb":
    return preprocess.apply_pp(_RGB_OPS, value, None)
  return dense.DECODERS[modality](value)


def parse_tokenizer_flag(value: str) -> dict[str, str]:
  """"rgb=DIR,depth=DIR" -> {"rgb": "DIR", "depth": "DIR"} (ConfigError on a bad spec)."""
  out = {}
  for item in filter(None, (x.strip() for x in value.split(","))):
    modality, sep, workdir = item.partition("=")
    if not sep or not workdir or modality not in FIELDS or modality in out:
      raise config_lib.ConfigError(
          f"--tokenizer {item!r}: give each modality once as MODALITY=WORKDIR, MODALITY one of "
          f"{list(FIELDS)}, e.g. --tokenizer rgb=/tmp/4m_tok_rgb.")
    out[modality] = workdir
  if not out:
    raise config_lib.ConfigError("--tokenizer: give at least one MODALITY=WORKDIR.")
  return out


def load_tokenizer(modality: str, workdir: str, step: int | None = None):
  """big_mm.models.vq.load(workdir, step), checked to tokenize `modality`."""
  from big_mm.models import vq  # pylint: disable=g-import-not-at-top
  if not epath.Path(workdir).exists():
    raise FileNotFoundError(f"--tokenizer {modality}={workdir}: no such directory; give the "
                            f"workdir of a trained vq_tokenizer run.")
  tok = vq.load(workdir, step)
  if tok.modality != modality:
    raise config_lib.ConfigError(f"--tokenizer {modality}={workdir} is a {tok.modality!r} "
                                 f"tokenizer; give it as --tokenizer {tok.modality}={workdir}.")
  return tok


def _check_tokenizer(modality: str, tok, shape: tuple[int, ...], data: str, batch: int):
  """ConfigError unless tok.encode maps [batch, *shape] inputs to int [batch, num_tokens]."""
  import jax  # pylint: disable=g-import-not-at-top
  dtype = np.int32 if modality == "semseg" else np.float32
  where = f"--tokenizer {modality}={getattr(tok, 'workdir', '?')}"
  try:
    out = jax.eval_shape(tok.encode, jax.ShapeDtypeStruct((batch,) + tuple(shape), dtype))
  except Exception as e:  # pylint: disable=broad-except  (any failure of the probe)
    raise config_lib.ConfigError(
        f"{where} cannot encode {data}'s {FIELDS[modality]!r} of shape {shape} (its encoder "
        f"fails: {type(e).__name__}: {str(e)[:200]}); train it on inputs of that size.") from None
  if tuple(out.shape) != (batch, tok.num_tokens) or not np.issubdtype(out.dtype, np.integer):
    raise config_lib.ConfigError(
        f"{where} has a {tok.grid} grid ({tok.num_tokens} codes) but encodes {data}'s "
        f"{FIELDS[modality]!r} of shape {shape} into {out.dtype}{list(out.shape)}: it was "
        f"trained on another size (image_size={getattr(tok, 'image_size', '?')}); train one on "
        f"{shape[0]}x{shape[1]} inputs.")


def _input_shape(features, modality: str, source, data: str) -> tuple[int, ...]:
  """The per-example shape of `modality`'s tokenizer input: its feature's shape where fixed,
  else the first decodable record's."""
  field = FIELDS[modality]
  shape = tuple(getattr(features[field], "shape", ()) or ())
  if shape and None not in shape:
    return shape
  for i in range(min(10, len(source))):
    try:
      return _decode(modality, source[i][field]).shape
    except preprocess.BadRecord:
      continue
  raise config_lib.ConfigError(f"{data}: none of its first 10 records has a decodable "
                               f"{field!r}.")


class CodeUsage:
  """Histogram of the codes of one modality: codes used and perplexity."""

  def __init__(self, vocab_size: int):
    self.counts = np.zeros(int(vocab_size), np.int64)

  def add(self, codes: np.ndarray) -> None:
    self.counts += np.bincount(codes.ravel(), minlength=len(self.counts))[:len(self.counts)]

  def summary(self) -> str:
    p = self.counts / max(self.counts.sum(), 1)
    perplexity = float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    used = int((self.counts > 0).sum())
    return (f"{used}/{len(self.counts)} codes used ({used / len(self.counts):.0%}), "
            f"perplexity {perplexity:.1f}")


def _builder_class(ds_name: str, features: dict[str, Any], description: str,
                   supervised_keys, generate: Callable[[str], Any], splits: list[str]):
  """A TFDS builder of `ds_name` (unregistered: read back from its files) writing `features`
  with `generate(split)`'s (key, example) pairs, in that order (no shuffling)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TokenizedDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A dataset with token codes (tools/tokenize_dataset.py)."""

    name = ds_name
    VERSION = tfds.core.Version(OUT_VERSION)
    RELEASE_NOTES = {OUT_VERSION: "Written by tools/tokenize_dataset.py."}

    # As in data/digits_captions.py: the default `code_path` probes `importlib_resources`.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
      return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(builder=self, description=description,
                                   features=tfds.features.FeaturesDict(features),
                                   supervised_keys=supervised_keys, disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing to download.
      return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split):
      yield from generate(split)

  return TokenizedDataset


def tokenize_dataset(data: str, tokenizers: dict[str, Any], *, data_dir: str | None = None,
                     out_name: str | None = None, splits: list[str] | None = None,
                     batch: int = 256, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes `out_name` (default DATA_tokens): `data`'s records plus "tok_<m>" int32 [N] =
  tokenizers[m].encode(the record's field), see the module docstring. tokenizers: {"rgb" /
  "depth" / "semseg": an object with big_mm.models.vq.load's API}. -> a summary dict
  (builder, per-split examples / dropped / examples_per_s, per-modality code usage)."""
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from data import digits_captions  # pylint: disable=g-import-not-at-top

  if batch < 1:
    raise config_lib.ConfigError(f"--batch must be >= 1, got {batch}.")
  unknown = sorted(set(tokenizers) - set(FIELDS))
  if unknown or not tokenizers:
    raise config_lib.ConfigError(f"Tokenizer modalities {unknown or 'none'}; give some of "
                                 f"{list(FIELDS)}.")
  if sources.mixture_parts(data) is not None or sources.parse_spec(data)[0] != "tfds":
    raise config_lib.ConfigError(f"--data {data!r}: give one prepared TFDS dataset (a name); "
                                 f"mixtures and tar / table files are not supported.")
  name = sources.parse_spec(data)[1]
  source_builder = sources._builder(name, data_dir)  # pylint: disable=protected-access
  info = source_builder.info
  features = info.features
  out_name = out_name or f"{name.split(':')[0].split('/')[0]}_tokens"
  all_splits = sorted(info.splits.keys())
  splits = list(splits or all_splits)
  bad = [s for s in splits if s not in all_splits]
  if bad:
    raise config_lib.ConfigError(f"--splits {bad} are not splits of {name!r}: {all_splits}.")
  missing = {m: FIELDS[m] for m in tokenizers if FIELDS[m] not in features}
  if missing:
    raise config_lib.ConfigError(f"{name!r} has no feature {sorted(missing.values())} for the "
                                 f"{sorted(missing)} tokenizer(s); its features: "
                                 f"{sorted(features.keys())}.")
  clash = [f"tok_{m}" for m in tokenizers if f"tok_{m}" in features]
  if clash:
    raise config_lib.ConfigError(f"{name!r} has token features {clash} already.")
  decoders = sources._skip_decoders(features)  # pylint: disable=protected-access
  read = {s: source_builder.as_data_source(split=s, decoders=decoders) for s in splits}
  shapes = {m: _input_shape(features, m, read[splits[0]], name) for m in tokenizers}
  for m, tok in tokenizers.items():
    _check_tokenizer(m, tok, shapes[m], name, batch)
  encode = {m: jax.jit(tok.encode) for m, tok in tokenizers.items()}

  made_by = "; ".join(
      f"tok_{m}: vq_tokenizer run {getattr(tok, 'workdir', '?')} step "
      f"{getattr(tok, 'step', '?')} (grid {tok.grid[0]}x{tok.grid[1]}, vocab {tok.vocab_size})"
      for m, tok in sorted(tokenizers.items()))
  description = (f"{name} ({info.version}) with token codes, written by "
                 f"tools/tokenize_dataset.py. Token codes: {made_by}.\n\nThe source "
                 f"dataset: {info.description}")
  out_features = dict(features.items())
  out_features.update({f"tok_{m}": tfds.features.Tensor(shape=(tok.num_tokens,), dtype=np.int32)
                       for m, tok in tokenizers.items()})
  usage = {m: CodeUsage(tok.vocab_size) for m, tok in tokenizers.items()}
  report: dict[str, Any] = {"splits": {}, "usage": usage}

  def generate(split):
    src, n = read[split], len(read[split])
    dropped, written, start = collections.Counter(), 0, time.time()
    for lo in range(0, n, batch):
      records, inputs = [], {m: [] for m in tokenizers}
      for i in range(lo, min(lo + batch, n)):
        record = dict(src[i])
        try:
          x = {m: _decode(m, record[FIELDS[m]]) for m in tokenizers}
        except preprocess.BadRecord as e:
          dropped[e.reason] += 1
          continue
        if any(v.shape != shapes[m] for m, v in x.items()):  # Not the size tokenized.
          dropped["wrong_size"] += 1
          continue
        records.append((i, record))
        for m, v in x.items():
          inputs[m].append(v)
      if not records:
        continue
      codes = {}
      for m in tokenizers:
        x = np.stack(inputs[m])
        pad = batch - len(x)  # Full batches only: one compilation.
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        codes[m] = np.asarray(encode[m](x))[:len(records)].astype(np.int32)
        usage[m].add(codes[m])
      for j, (i, record) in enumerate(records):
        record.update({f"tok_{m}": codes[m][j] for m in tokenizers})
        yield i, record
      written += len(records)
      rate = written / max(time.time() - start, 1e-9)
      log(f"{split}: {min(lo + batch, n)}/{n} examples ({rate:.0f} examples/s)")
    seconds = time.time() - start
    report["splits"][split] = dict(examples=written, dropped=dict(dropped),
                                   examples_per_s=written / max(seconds, 1e-9))

  builder_cls = _builder_class(out_name, out_features, description, info.supervised_keys,
                               generate, splits)
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    raise config_lib.ConfigError(f"Dataset {out_name!r} {OUT_VERSION} exists already in "
                                 f"{builder.data_dir}; delete that directory to rebuild it, or "
                                 f"give another --out_name.")
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  report["builder"] = builder
  for split, r in report["splits"].items():
    log(f"{split}: wrote {r['examples']} examples ({r['examples_per_s']:.0f} examples/s); "
        f"dropped: {r['dropped'] or 'none'}")
  for m in sorted(usage):
    log(f"tok_{m}: {usage[m].summary()}")
  log(f"Wrote {out_name!r} to {builder.data_dir}. {made_by}.")
  return report


def _run_command_line(flags, overrides) -> int:
  if overrides:
    raise config_lib.ConfigError(f"tokenize_dataset takes no --config.* overrides, got "
                                 f"{sorted(overrides)}.")
  step = cli.int_flag(flags, "step")
  tokenizers = {m: load_tokenizer(m, d, step)
                for m, d in parse_tokenizer_flag(flags["tokenizer"]).items()}
  splits = [s.strip() for s in flags.get("splits", "").split(",") if s.strip()] or None
  batch = cli.int_flag(flags, "batch")
  tokenize_dataset(flags["data"], tokenizers, data_dir=flags.get("data_dir"),
                   out_name=flags.get("out_name"), splits=splits,
                   batch=256 if batch is None else batch,
                   log=lambda line: print(line, file=sys.stderr, flush=True))
  return 0


def main(argv: list[str]) -> int:
  # --tokenizer may be repeated: its values are joined with commas (cli keeps one per flag).
  specs, rest, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--tokenizer="):
      specs.append(arg.partition("=")[2])
    elif arg == "--tokenizer" and i + 1 < len(argv):
      specs.append(argv[i + 1])
      i += 1
    else:
      rest.append(arg)
    i += 1
  if specs:
    rest.append(f"--tokenizer={','.join(specs)}")
  return cli.main(_run_command_line, rest, doc=__doc__, flags=FLAGS,
                  required=("data", "tokenizer"))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
