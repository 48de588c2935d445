"""Data sources: random access (len + getitem) to image-text records, raw image bytes.

  src = open_source("digits_captions", "train", data_dir=None)
  len(src); src[3] -> {"image": b"\\x89PNG...", "text": "handwritten 7", "label": 7, "id": 12}

`input.data` (the `data` argument) selects the source:

  "digits_captions", "tfds:coco/2017"      a prepared TFDS dataset (array_record), TF-free
  "tar:/data/{00000..00099}.tar"          webdataset / img2dataset tar shards (webdataset.py)
  "parquet:gs://b/pairs.parquet"          image-caption tables (tables.py); also csv:,
  "csv:/data/*.csv", "jsonl:/data/x.jsonl"  jsonl:; a folder means its files of that type
  (("digits_captions", 0.7), ("tar:...", 0.3))  a weighted mixture (mixture.py); a dict
                                          {spec: weight} works from Python
The prefix may be left out when the path ends in .tar/.parquet/.csv/.jsonl. Paths take
brace ranges, globs and any fsspec URL. Splits: a TFDS dataset uses TFDS split syntax;
a file spec names its own files, so the split only picks files through a `{split}`
placeholder (`tar:/data/{split}/*.tar`) and slices with `[a:b]` (`train[:95%]`,
`train[-1000:]`); without a placeholder every split name reads the same files. Give
held-out data to an evaluator with `evals.NAME.data`.

TFDS Image (and Video) features are returned as encoded bytes (TFDS `SkipDecoding`),
text as `str`; everything else as TFDS decodes it (numpy scalars / arrays, nested features
as nested dicts). `text_column` / `image_column` name the TFDS feature that becomes the
record's "text" / "image"; a nested feature by its path, e.g. `captions/text` in
`coco_captions` (a list of str: every caption of the image). File sources
return {"image": bytes, "text": str (several captions: a JSON list string), "key": str}. A
record that cannot be used raises `BadRecord(reason)`, a reason of SKIP_REASONS (the
pipeline skips and counts it; every source names the same problem alike). Sources are
picklable (TFDS and table sources re-open their files after unpickling, tar sources
carry their index), so grain worker processes can use them.
"""
from __future__ import annotations

import difflib
import functools
import math
import os
import re
from typing import Any, Mapping

import fsspec
import numpy as np

from big_mm.input import files
from big_mm.input import tables
from big_mm.input.preprocess import BadRecord

# Why a record is skipped: the one vocabulary every source (TFDS, tar shards, tables,
# mixtures) and every preprocessing step (images, captions, dense maps) counts under, as
# `BadRecord.reason` and the `data/skipped/<reason>` metrics. README.md lists it.
SKIP_REASONS = {
    "read": "the record cannot be read (I/O error, corrupt file or record)",
    "malformed_record": "a jsonl / csv line, or a tar record's .json, that does not parse",
    "missing_field": "the record has no image or no caption (absent, null, wrong column / "
                     "field name); in binding mode, none of input.modalities",
    "empty_caption": "the caption is empty or only whitespace",
    "bad_caption_encoding": "the caption's bytes are not UTF-8, or it is not text",
    "empty_image": "the image has 0 bytes or 0 pixels",
    "corrupt_image": "the image bytes do not decode (truncated, not an image)",
    "image_too_large": "the image has more pixels than decode's max_pixels",
    "too_small": "the image is smaller than a crop",
    "corrupt_depth": "the depth map does not decode, or has no known unit (8-bit)",
    "corrupt_semseg": "the segmentation map does not decode, or holds non-integer ids",
    "bad_depth_shape": "the depth map is not [H, W] / [H, W, 1] of the image's H, W",
    "bad_semseg_shape": "the segmentation map is not [H, W] / [H, W, 1] of the image's H, W",
    "nonfinite_depth": "the depth map holds NaN or inf",
    "bad_boxes": "the boxes (input.box_column) are not [n, 4] yxyx in [0, 1], or their texts "
                 "(input.box_text_column) are missing, empty or not one per box",
    "missing_codes": "the record has no token codes of a tok_* modality in input.modalities",
    "bad_codes": "a tok_* field is not 1-D non-negative int32 codes of its dataset's length",
    "corrupt_audio": "the audio bytes do not decode (truncated, not audio) or the array is not "
                     "[n] / [n, channels] numbers",
    "empty_audio": "the audio has 0 bytes or 0 samples",
    "nonfinite_audio": "the audio holds NaN or inf samples",
    "audio_too_long": "the audio is longer than decode_audio's max_seconds",
    "bad_vector": "a vector modality's value (vec_*) is not exactly vector(d)'s d finite numbers",
    "bad_points": "a point cloud is not a finite [n, 3] (or [n, >= 3], xyz first) array or .npy, "
                  "or has too few points",
    "corrupt_video": "the video does not decode (truncated, not a video, a needed frame "
                     "missing) or the frame array / list is not frames",
    "empty_video": "the video has 0 bytes, no video stream or no frames",
    "video_too_short": "the video is shorter than sample_clip's span (with short='skip')",
    "video_too_long": "the video is longer than decode_video's max_seconds / max_frames",
    "part_dropped": "a slot of a mixture part dropped by input.drop_failing_parts",
}

# Datasets whose builder lives in this repo, with the command that builds them.
BUILD_COMMANDS = {
    "digits_captions": "python data/build_demo.py --data_dir {data_dir}",
    "digits_speech": "apt-get install espeak-ng klettres-data; python data/build_demo.py "
                     "--binding --data_dir {data_dir}",
    "spoken_digits": "apt-get install espeak-ng klettres-data; python data/build_demo.py "
                     "--binding --data_dir {data_dir}",
    "klettres_speech": "apt-get install espeak-ng klettres-data; python data/build_demo.py "
                       "--binding --data_dir {data_dir}",
    "symile_xor": "python data/build_demo.py --binding --data_dir {data_dir}",
    "digits_pairs": "python data/build_demo.py --data_dir {data_dir}",
    "digits_pairs_wide": "python data/build_demo.py --data_dir {data_dir}",
    "digits_boxes": "python data/build_demo.py --data_dir {data_dir}",
    "multimodal_scenes": "python data/build_demo.py --data_dir {data_dir}",
    "multimodal_scenes_tokens": ("python tools/tokenize_dataset.py --data multimodal_scenes "
                                 "--data_dir {data_dir} --tokenizer rgb=RGB_RUN --tokenizer "
                                 "depth=DEPTH_RUN --tokenizer semseg=SEMSEG_RUN (vq_tokenizer "
                                 "runs of configs/demo_4m_tokenizer.py)"),
    # ImageNet cannot be downloaded by TFDS: the tars come from image-net.org (log-in).
    "imagenet2012": ("put ILSVRC2012_img_val.tar (and ILSVRC2012_img_train.tar) from "
                     "image-net.org in the data dir's downloads/manual/, then tfds build "
                     "imagenet2012 --file_format array_record --data_dir {data_dir}"),
}


def default_data_dir() -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return os.fspath(tfds.core.constants.DATA_DIR) if hasattr(
      tfds.core, "constants") else os.path.expanduser("~/tensorflow_datasets")


def _base_name(name: str) -> str:
  return name.split(":")[0].split("/")[0]


def prepared_datasets(data_dir: str | None) -> dict[str, list[str]]:
  """The datasets prepared in `data_dir` (None: TFDS's default): {"name" or "name/config":
  [versions]}, found by their dataset_info.json files."""
  root = data_dir or default_data_dir()
  found: dict[str, list[str]] = {}
  try:
    fs, fs_root = fsspec.core.url_to_fs(root)
    fs_root = fs_root.rstrip("/")
    infos = (fs.glob(f"{fs_root}/*/*/dataset_info.json")
             + fs.glob(f"{fs_root}/*/*/*/dataset_info.json"))
  except Exception:  # pylint: disable=broad-except  Unlistable: nothing to suggest.
    return found
  for info in infos:
    *parts, version, _ = info[len(fs_root) + 1:].split("/")
    if _VERSION.match(version):
      found.setdefault("/".join(parts), []).append(version)
  return {k: sorted(v) for k, v in sorted(found.items())}


def _closest_prepared(name: str, data_dir: str | None) -> str:
  """A sentence naming the prepared datasets closest to `name` (difflib), or what is
  prepared."""
  prepared = prepared_datasets(data_dir)
  wanted, _, version = name.partition(":")
  if wanted in prepared and version:
    return f"Prepared versions of {wanted!r}: {prepared[wanted]} (asked for {version!r})."
  close = difflib.get_close_matches(wanted, list(prepared), n=3, cutoff=0.6)
  if close:
    return f"Did you mean {' or '.join(repr(c) for c in close)} (prepared there)?"
  names = list(prepared)
  if names:
    more = f" and {len(names) - 20} more" if len(names) > 20 else ""
    return f"Prepared there: {names[:20]}{more}."
  return "No dataset is prepared there."


def missing_dataset_message(name: str, data_dir: str | None) -> str:
  searched = data_dir or f"{default_data_dir()} (TFDS default; set TFDS_DATA_DIR or input.data_dir)"
  cmd = BUILD_COMMANDS.get(_base_name(name))
  if cmd:
    cmd = cmd.format(data_dir=data_dir or "DIR").replace(" --data_dir DIR", " [--data_dir DIR]")
  else:
    cmd = f"tfds build {name}" + (f" --data_dir {data_dir}" if data_dir else "")
  return (f"TFDS dataset {name!r} not found (prepared array_record files) in data_dir "
          f"{searched}. {_closest_prepared(name, data_dir)} To build it: {cmd}")


class DatasetNotFound(FileNotFoundError):
  """A dataset is not prepared where we looked."""


def _builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError, and friends. (Its message lists
    # every TFDS dataset; keep only its type.)
    try:
      # Catalog builders whose code imports TensorFlow (coco_captions, ...) cannot be
      # constructed TF-free; a prepared copy is read from its files alone.
      builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
    except Exception:  # pylint: disable=broad-except
      raise DatasetNotFound(missing_dataset_message(name, data_dir)
                            + f" [{type(e).__name__}]") from None
  if not builder.is_prepared():
    raise DatasetNotFound(missing_dataset_message(name, data_dir))
  return builder


@functools.lru_cache(maxsize=None)
def _info(name: str, data_dir: str | None):
  b = _builder(name, data_dir)
  return b.info


def _skip_decoders(features) -> dict[str, Any]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  skip = (tfds.features.Image, tfds.features.Video)
  return {k: tfds.decode.SkipDecoding() for k, f in features.items() if isinstance(f, skip)}


def num_examples(data, split: str, data_dir: str | None = None, **options) -> int:
  """Number of examples of `split` (slices like "train[:10%]" work; a mixture's virtual
  epoch). options: as open_source's."""
  return len(open_source(data, split, data_dir, **options))


def label_names(name, data_dir: str | None = None, key: str = "label") -> list[str] | None:
  """Class names of the `key` ClassLabel feature, or None if there is none (or `name` is
  not a single TFDS dataset)."""
  if mixture_parts(name) is not None or parse_spec(name)[0] != "tfds":
    return None
  name = parse_spec(name)[1]
  features = _info(name, data_dir).features
  f = features[key] if key in features.keys() else None
  return list(f.names) if f is not None and hasattr(f, "names") else None


def _feature_path(features, path: str) -> tuple[str, ...] | None:
  """The keys leading to the TFDS feature named `path` ("captions/text": through nested
  FeaturesDicts and Sequences; a key may hold "/" itself, like coco's "image/id"), or None."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  keys, node, rest = [], features, path
  while True:
    if isinstance(node, tfds.features.Sequence):
      node = node.feature
    if not isinstance(node, tfds.features.FeaturesDict):
      return None
    key = max((k for k in node.keys() if rest == k or rest.startswith(k + "/")), key=len,
              default=None)
    if key is None:
      return None
    keys.append(key)
    if rest == key:
      return tuple(keys)
    node, rest = node[key], rest[len(key) + 1:]


def _feature_paths(node, prefix: str = "") -> list[str]:
  """Every leaf feature's path ("captions/text", "image/id", ...)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if isinstance(node, tfds.features.Sequence):
    node = node.feature
  if not isinstance(node, tfds.features.FeaturesDict):
    return [prefix.rstrip("/")]
  return [p for k in node.keys() for p in _feature_paths(node[k], f"{prefix}{k}/")]


def _decode_text(value, where: str):
  """TFDS text as read (bytes, or a list / array of them) -> str / list of str; bytes that
  are not UTF-8 raise BadRecord("bad_caption_encoding") naming `where`."""
  if isinstance(value, (bytes, np.bytes_)):
    try:
      return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord("bad_caption_encoding", f"{where}: {e}") from None
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_decode_text(v, where) for v in value]
  return value


class TfdsSource:
  """Random access to one split of a prepared TFDS dataset; raw image bytes.

  text_column / image_column: the feature (a path for nested ones) returned as "text" /
  "image"; None: the features named "text" / "image", if any.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None, *,
               image_column: str | None = None, text_column: str | None = None):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.image_column, self.text_column = image_column, text_column
    self._open()

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = _builder(self.name, self.data_dir)
    features = builder.info.features
    self._text_keys = tuple(k for k, f in features.items()
                            if isinstance(f, tfds.features.Text))
    self._columns = {}
    for field, column in (("image", self.image_column), ("text", self.text_column)):
      if column is None:
        continue
      keys = _feature_path(features, column)
      if keys is None:
        raise ValueError(f"TFDS dataset {self.name!r} has no feature {column!r} (the "
                         f"{field}_column); its features: {_feature_paths(features)}. "
                         f"Name one of them (nested ones by path, e.g. 'captions/text').")
      images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
      if field == "image" and column not in images:
        raise ValueError(f"image_column {column!r} of TFDS dataset {self.name!r} is not a "
                         f"top-level Image feature; its Image features: {images}.")
      self._columns[field] = keys
    try:
      self._ds = builder.as_data_source(split=self.split,
                                        decoders=_skip_decoders(features))
    except ValueError as e:
      splits = sorted(builder.info.splits.keys())
      asked = re.split(r"[\[+]", self.split)[0]
      close = [s for s in splits if asked and (s.startswith(asked) or asked.startswith(s))]
      close = close or difflib.get_close_matches(asked, splits, n=2, cutoff=0.6)
      hint = f"Did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
      raise ValueError(f"Bad split {self.split!r} for {self.name!r}: {hint}valid splits are "
                       f"{splits} (TFDS slicing like 'train[:90%]' works too).") from e

  def __getstate__(self):
    return {"name": self.name, "split": self.split, "data_dir": self.data_dir,
            "image_column": self.image_column, "text_column": self.text_column}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = dict(self._ds[int(index)])
    where = f"{self.name} {self.split} example {index}"
    for k in self._text_keys:
      if isinstance(ex.get(k), (bytes, np.bytes_)):
        try:
          ex[k] = _decode_text(ex[k], f"{where}, feature {k!r}")
        except BadRecord:
          if k == "text" and "text" not in self._columns:
            raise  # The caption.
          # Another text feature: kept as the bytes it holds.
    for field, keys in self._columns.items():
      value = functools.reduce(lambda node, key: node[key], keys, ex)
      ex[field] = (_decode_text(value, f"{where}, feature {self.text_column!r}")
                   if field == "text" else value)
    return ex

  def __repr__(self):
    return (f"TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, "
            f"image_column={self.image_column!r}, text_column={self.text_column!r})")


# ---- specs ------------------------------------------------------------------------------

SPEC_KINDS = ("tfds", "tar") + tables.FORMATS
_EXTENSIONS = {".tar": "tar", ".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_TFDS_NAME = re.compile(r"^[a-z0-9_]+(/[A-Za-z0-9_.+-]+)?(:[0-9.*]+)?$")
_SPEC_HELP = ("Use a TFDS name (digits_captions), tar:PATH (e.g. tar:/data/{00000..00099}.tar "
              "or a folder), parquet:PATH, csv:PATH, jsonl:PATH (the prefix may be left out "
              "when the path ends in .tar/.parquet/.csv/.jsonl), or a mixture "
              "((spec, weight), ...).")


class SpecError(ValueError):
  """`input.data` cannot be understood."""


def parse_spec(spec: str) -> tuple[str, str]:
  """One source spec -> (kind, target): ("tfds", name) or (tar|parquet|csv|jsonl, path)."""
  if not isinstance(spec, str) or not spec.strip():
    raise SpecError(f"Data spec {spec!r} is not a non-empty string. {_SPEC_HELP}")
  spec = spec.strip()
  if spec.lower().endswith((".tar.gz", ".tgz", ".tar.zst")):
    raise SpecError(f"Data spec {spec!r}: compressed tar shards cannot be read by offset; "
                    f"decompress them (records are compressed images already) or convert "
                    f"them with data/convert.py.")
  kind, sep, rest = spec.partition(":")
  if sep and kind in SPEC_KINDS:
    if not rest:
      raise SpecError(f"Data spec {spec!r} names no {'dataset' if kind == 'tfds' else 'path'} "
                      f"after '{kind}:'. {_SPEC_HELP}")
    return kind, rest
  for ext, kind in _EXTENSIONS.items():
    if spec.lower().endswith(ext):
      return kind, spec
  if _TFDS_NAME.match(spec):
    return "tfds", spec
  raise SpecError(f"Cannot tell what data spec {spec!r} is. {_SPEC_HELP}")


def mixture_parts(data) -> list[tuple[str, float]] | None:
  """A mixture spec -> [(spec, weight), ...]; None if `data` is a single spec (a string)."""
  if isinstance(data, str):
    return None
  if isinstance(data, Mapping) or hasattr(data, "items"):
    pairs = list(data.items())
  elif isinstance(data, (list, tuple)) and all(
      isinstance(p, (list, tuple)) and len(p) == 2 for p in data):
    pairs = [tuple(p) for p in data]
  else:
    raise SpecError(f"Data spec {data!r} is neither a spec string nor a mixture. {_SPEC_HELP}")
  if not pairs:
    raise SpecError(f"Mixture {data!r} is empty. {_SPEC_HELP}")
  out = []
  for spec, weight in pairs:
    if not isinstance(spec, str):
      raise SpecError(f"Mixture component {spec!r} is not a spec string (mixtures do not "
                      f"nest). {_SPEC_HELP}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
        math.isfinite(weight) and weight > 0):
      raise SpecError(f"Mixture weight of {spec!r} is {weight!r}; weights must be positive "
                      f"numbers (they are normalised to sum to 1).")
    out.append((spec, float(weight)))
  return out


def check_data(data) -> list[tuple[str, str]]:
  """Checks the syntax of `input.data` (no file access) -> [(kind, target), ...]."""
  parts = mixture_parts(data)
  return [parse_spec(spec) for spec, _ in parts] if parts else [parse_spec(data)]


def files_without_split(data) -> list[str]:
  """The file specs in `data` that read the same files whatever the split."""
  return [target for kind, target in check_data(data)
          if kind != "tfds" and "{split}" not in target]


def source_options(input_cfg) -> dict[str, Any]:
  """The keyword options of open_source() held in an input config (binding mode: `fields`,
  the record fields of the listed modalities besides image and text)."""
  get = input_cfg.get if hasattr(input_cfg, "get") else lambda k, d=None: getattr(input_cfg, k, d)
  options = {"image_column": get("image_column", None), "text_column": get("text_column", None)}
  from big_mm import modalities  # pylint: disable=g-import-not-at-top
  listed = [modalities.get(m) for m in get("modalities", None) or ()]
  if any(m.kind in modalities.PP_SHAPED for m in listed):
    options["fields"] = tuple(m.field(input_cfg) for m in listed
                              if m.name not in ("image", "text"))
  return options


def _open_files(data: str, kind: str, target: str, split: str | None, **options):
  from big_mm.input import webdataset  # pylint: disable=g-import-not-at-top
  fields = options.pop("fields", None) if kind == "tar" else None
  if fields and tuple(fields) != ("video",):
    raise SpecError(f"{data!r}: tar shards hold image-text records, or video-text records "
                    f"(field 'video': .mp4 / .webm / .avi / .mkv members; binding fields "
                    f"{tuple(fields)}); for audio, points or vector modalities use TFDS or "
                    "table (parquet / jsonl / csv) sources.")
  if fields:
    options["video"] = True
  name, _ = files.parse_split(split)
  try:
    paths = files.expand(target, split=name, suffix="." + kind)
  except files.FilesNotFound as e:
    raise DatasetNotFound(
        f"No data for {data!r}: {e} Check the path (brace ranges like {{00000..00099}}, "
        f"globs and folders work; a {{split}} placeholder takes the split name "
        f"{name!r}).") from None
  if kind == "tar":
    source = webdataset.TarSource(paths, **options)
  else:
    source = tables.TableSource(paths, kind, **options)
  if not len(source):
    raise DatasetNotFound(f"{data!r} ({len(paths)} files) holds no records.")
  return files.apply_split_slice(source, split)


def open_source(data, split: str = "train", data_dir: str | None = None, *,
                image_column: str | None = None, text_column: str | None = None,
                fields: tuple[str, ...] = ()):
  """Opens `split` of `data` (a spec, see the module docstring) as a random-access source.

  image_column / text_column: for tables the column names, for tar shards the image
  extension and the json caption field, for TFDS the feature (path) read as the image /
  the text (None: the defaults). DatasetNotFound says what
  is missing and how to get it; SpecError that the spec itself is wrong.
  """
  options = {"image_column": image_column, "text_column": text_column}
  if fields:  # Binding mode: tables pass these columns through, image and text optional.
    options["fields"] = tuple(fields)
  parts = mixture_parts(data)
  if parts is not None:
    from big_mm.input import mixture  # pylint: disable=g-import-not-at-top
    return mixture.MixtureSource([open_source(spec, split, data_dir, **options)
                                  for spec, _ in parts],
                                 [w for _, w in parts], [spec for spec, _ in parts])
  kind, target = parse_spec(data)
  if kind == "tfds":
    options.pop("fields", None)  # TFDS records carry every feature.
    return TfdsSource(target, split, data_dir, **options)
  return _open_files(data, kind, target, split, **options)
