"""Input pipelines (grain): an endless, checkpointable training iterator and eval batches.

Training data order. The epoch-e order of the N examples is a seeded permutation
(`grain.experimental.index_shuffle`, seed derived from (seed, e)); epochs are
concatenated into one endless global stream, and process p of P reads stream positions
p, p+P, p+2P, ... (disjoint, together covering every epoch). Each step a process takes
the next global_batch_size/P good examples. Random preprocessing draws from an rng
seeded by (seed, epoch, example index), so batches do not depend on num_workers or
threads. With input.language_temperature the source is first resampled by language
(languages.py: a stateless virtual epoch, so all of this holds unchanged; the mix is logged
at start-up). Bad records (`BadRecord`, unreadable records) are skipped before batching
and counted per reason (`it.stats()`); batch shapes never change. A source (a mixture
part, or the one source) with more than input.max_bad_fraction bad records among its
last _BAD_WINDOW reads is broken, not noisy: the run stops with `SourceFailed` naming it,
or, with input.drop_failing_parts, that mixture part is dropped (error log; its slots
are then skipped as "part_dropped").

  it = make_train_iterator(config.input, global_batch_size=256, seed=0, sharding=s)
  batch = next(it)              # {"image": f32 [B,H,W,3], "text": i32 [B,L]} global arrays
                                # (input.captions_per_example = k > 1: "text" i32 [B,k,L],
                                # k captions of each image; see _SampledCaptions)
                                # (+ "prefix": i32 [B,P] with input.prefix_column)
                                # (+ "boxes": f32 [B,K,4], "box_text": i32 [B,K,Lr] with
                                # input.box_column; see big_mm/input/boxes.py)
                                # input.modalities: + "depth" f32 [B,H,W], "semseg" i32
                                # [B,H,W], "{m}_present" i32 [B] (see _load_modalities);
                                # token codes "tok_rgb" etc. i32 [B,N] as stored
  state = it.get_state()        # JSON-serialisable; it.set_state(state) resumes exactly

  for batch in make_eval_batches(config.input, "test", 256, s):   # padded, with "mask"
    ...
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Iterator

import grain
import numpy as np

from big_mm import modalities as modalities_lib
from big_mm.input import boxes as boxes_lib
from big_mm.input import dense
from big_mm.input import files
from big_mm.input import languages
from big_mm.input import preprocess
from big_mm.input import sources
from big_mm.input import tokenizer as tokenizer_lib

_SKIP = "__skip__"  # Key of the marker element standing for a skipped record.
_PART = "__part__"  # Key of the mixture part (0 for a single source) a train element read.
_MAX_STREAM = 2**62
_BAD_WINDOW = 1000  # Reads per source over which input.max_bad_fraction is checked.
# What to check when most of a source's records fail for a reason (see SourceFailed).
_BAD_SOURCE_HINTS = {
    "read": "its files cannot be read: check that they exist, are complete and readable "
            "from every host (permissions, credentials, network)",
    "missing_field": "its records lack the image or the caption: check input.image_column / "
                     "input.text_column against its records",
    "corrupt_image": "its images do not decode: check that its files hold images (not "
                     "truncated, not HTML error pages)",
}


class SourceFailed(RuntimeError):
  """Most records of one source are bad: its data or its input config is wrong."""


def _get(cfg, key, default=None):
  """Reads a key from a ConfigDict / dict / object, with a default."""
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  try:
    return cfg[key] if key in cfg else default  # ConfigDict
  except TypeError:
    return getattr(cfg, key, default)


def _u32(*xs: int) -> int:
  """A 32-bit seed mixed from integers (for index_shuffle)."""
  return int(np.random.SeedSequence([int(x) % 2**63 for x in xs]).generate_state(1)[0])


def _example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  return np.random.default_rng([int(seed) % 2**63, int(epoch), int(index)])


def example_pp(input_cfg, pp_image: str | None = None) -> str:
  """The whole-example pp string: the image ops (`pp_image` if given, else
  input_cfg.pp_image), then the text ops (input_cfg.pp_text, by default
  `tokenize(text_len)` when a tokenizer is set; no text ops without one)."""
  pp = pp_image or _get(input_cfg, "pp_image")
  pp_text = _get(input_cfg, "pp_text")
  if not pp_text and _get(input_cfg, "tokenizer"):
    pp_text = f"tokenize({int(_get(input_cfg, 'text_len', 16))})"
  return f"{pp}|{pp_text}" if pp_text else pp


def _tokenize_prefix(tokenizer, value, length: int) -> tuple[np.ndarray, bool]:
  """A record's text prefix (str / bytes / list: the first one) -> (int32 [length], truncated).

  Plain SentencePiece ids, 0-padded, no EOS (the caption's BOS follows the prefix); no pp ops
  (e.g. no lowercase). A missing or empty prefix is all pad (the model then sees no prefix).
  """
  try:
    text = "" if value is None else preprocess.captions(value)[0]
  except preprocess.BadRecord as e:
    if e.reason != "empty_caption":
      raise
    text = ""
  ids, truncated = tokenizer.encode_with_info([text], length + 1)  # + 1: room for its EOS
  ids = ids[0, :length]
  ids[ids == tokenizer.eos_id] = tokenizer.pad_id
  return ids, bool(truncated[0])


class _EveryCaption:
  """A Preprocessor whose text is int32 [count, L]: each of the record's first `count`
  captions through the text ops (ending in tokenize), all-zero rows where it has fewer."""

  def __init__(self, pp: preprocess.Preprocessor, count: int):
    if not any(o.name == "tokenize" for o in pp.ops):
      raise ValueError(f"Every-caption text (retrieval's captions_per_image) needs a pp that "
                       f"tokenizes; {pp.pp!r} does not. Set input.tokenizer.")
    self.preprocessor, self.count = pp, int(count)
    self.pp, self.ops, self.tokenizer = pp.pp, pp.ops, pp.tokenizer

  def __call__(self, example, rng, *, optional=(), ctx=None):
    run = self.preprocessor
    if example.get(preprocess.TEXT) is None:
      return run(example, rng, optional=optional, ctx=ctx)
    values, counts = run({preprocess.IMAGE: example.get(preprocess.IMAGE)}, rng,
                         optional=tuple(optional) + (preprocess.TEXT,), ctx=ctx)
    rows = []
    for caption in preprocess.captions(example[preprocess.TEXT])[:self.count]:
      text, caption_counts = run({preprocess.TEXT: caption}, rng, optional=(preprocess.IMAGE,))
      rows.append(text[preprocess.TEXT])
      counts.update(caption_counts)
    values[preprocess.TEXT] = np.zeros((self.count,) + rows[0].shape, np.int32)
    values[preprocess.TEXT][:len(rows)] = rows
    return values, counts


class _SampledCaptions:
  """A Preprocessor for input.captions_per_example = k / input.split_long_captions (training):
  the text ops before tokenize run on all of the record's captions; with split_long, each
  caption longer than tokenize's length is split into sub-captions that fit
  (preprocess.split_long_caption, counted as text_split); then k captions are drawn
  (preprocess.sample_captions: without replacement, or cycled when the record has fewer,
  counted as text_repeated) and tokenized: text int32 [k, L] (k = 1: [L])."""

  def __init__(self, pp: preprocess.Preprocessor, count: int, split_long: bool):
    tokenize = [o for o in pp.ops if o.name == "tokenize"]
    if not tokenize:
      raise ValueError(f"input.captions_per_example / split_long_captions need a pp that "
                       f"tokenizes; {pp.pp!r} does not. Set input.tokenizer.")
    if count > 1 and any(o.name == "choose_caption" for o in pp.ops):
      raise ValueError(f"input.captions_per_example={count} draws {count} captions per image, "
                       f"but input.pp_text's choose_caption keeps only one; remove it.")
    self.preprocessor, self.count, self.split_long = pp, int(count), bool(split_long)
    self.pp, self.ops, self.tokenizer = pp.pp, pp.ops, pp.tokenizer
    self.text_ops = [o for o in pp.ops if o.key == preprocess.TEXT and o.name != "tokenize"]
    self.tokenize = tokenize[-1]

  def _fits(self, caption: str) -> bool:
    return not self.tokenizer.encode_with_info([caption], self.tokenize.args[0])[1][0]

  def __call__(self, example, rng, *, optional=(), ctx=None):
    run = self.preprocessor
    if example.get(preprocess.TEXT) is None:
      return run(example, rng, optional=optional, ctx=ctx)
    values, counts = run({preprocess.IMAGE: example.get(preprocess.IMAGE)}, rng,
                         optional=tuple(optional) + (preprocess.TEXT,), ctx=ctx)
    ctx = preprocess.Context(self.tokenizer, counts)
    caps = preprocess.captions(preprocess.apply_pp(self.text_ops, example[preprocess.TEXT],
                                                   rng, ctx))
    if self.split_long:
      pieces = [preprocess.split_long_caption(c, self._fits) for c in caps]
      counts["text_split"] += sum(len(p) > 1 for p in pieces)
      caps = [p for piece in pieces for p in piece]
    if len(caps) < self.count:
      counts["text_repeated"] += 1
    rows = [self.tokenize([c], rng, ctx) for c in preprocess.sample_captions(caps, self.count,
                                                                            rng)]
    values[preprocess.TEXT] = np.stack(rows) if self.count > 1 else rows[0]
    return values, counts


class _Example:
  """Loads + preprocesses one example: dict of numpy arrays or a skip marker. Picklable.

  Bad records come back as {_SKIP: reason, ...}; preprocessing counts (text_truncated,
  prefix_truncated) ride along under "_counts" when non-zero. Text is optional when
  `keep_label` (eval splits of image-only datasets); otherwise a record without it is bad
  (missing_field).
  """

  def __init__(self, source, input_cfg, *, pp_image: str | None = None, keep_label=False,
               image_key="image", text_key="text", label_key="label", captions=None,
               captions_per_example=1, split_long_captions=False):
    self.source = source
    self.pp = preprocess.Preprocessor(example_pp(input_cfg, pp_image),
                                      tokenizer=_tokenizer(input_cfg))
    if captions:
      self.pp = _EveryCaption(self.pp, captions)
    elif captions_per_example > 1 or split_long_captions:
      self.pp = _SampledCaptions(self.pp, captions_per_example, split_long_captions)
    self.image_key, self.text_key, self.label_key = image_key, text_key, label_key
    self.keep_label = keep_label
    self.uint8 = preprocess.keeps_uint8(self.pp.pp)  # images stay uint8 (pp op keep_uint8)
    self.optional = (preprocess.TEXT,) if keep_label else ()
    # input.modalities (MultiMAE): fields per modality, dense maps jointly augmented.
    self.modalities = tuple(_get(input_cfg, "modalities") or ())
    self.binding = binding_mode(input_cfg)
    if self.binding:
      self._init_binding(input_cfg, pp_image or _get(input_cfg, "pp_image"))
    elif self.modalities:
      image = modalities_lib.get("image")
      fields = {m: modalities_lib.get(m).field(input_cfg) for m in self.modalities
                if modalities_lib.get(m) is not image}
      is_codes = lambda m: modalities_lib.get(m).kind == modalities_lib.CODES
      self.fields = {m: f for m, f in fields.items() if not is_codes(m)}
      # Token codes pass through as stored: {modality: (field, N)}.
      self.codes = {m: (f, _codes_length(source, f, m)) for m, f in fields.items()
                    if is_codes(m)}
      self.joint = dense.JointPreprocessor(self.pp.pp, tokenizer=self.pp.tokenizer,
                                           codes=bool(self.codes))
      tokenize = [o for o in self.pp.ops if o.name == "tokenize"]
      if "text" in self.fields and not tokenize:
        raise ValueError("input.modalities has 'text', but the pp has no tokenize op; set "
                         "input.tokenizer (or input.pp_text ending in tokenize(text_len)).")
      self.text_len = tokenize[-1].args[0] if tokenize else 0
    # Text prefix (prefix-LM captioners): batch["prefix"] int32 [prefix_len].
    self.prefix_key = _get(input_cfg, "prefix_column")
    self.prefix_len = int(_get(input_cfg, "prefix_len", 0) or 0)
    if self.prefix_key and (self.prefix_len < 1 or self.pp.tokenizer is None):
      raise ValueError(f"input.prefix_column={self.prefix_key!r} needs input.prefix_len >= 1 "
                       f"(got {self.prefix_len}) and input.tokenizer.")
    # Boxes (LocCa): batch["boxes"] [K, 4] and batch["box_text"] [K, Lr] (input/boxes.py).
    self.box_key = _get(input_cfg, "box_column")
    if self.box_key:
      self._init_boxes(input_cfg)

  def _init_binding(self, input_cfg, pp_image: str) -> None:
    """Binding mode: {modality: (field, ops, shape)} of the pp-shaped modalities; image and
    text keep the example pp (each optional) and get zeros of their shape when absent."""
    names = [modalities_lib.get(m).name for m in self.modalities]
    self.shaped = {}
    for m in names:
      mod = modalities_lib.get(m)
      if mod.kind in modalities_lib.PP_SHAPED:
        pp = (_get(input_cfg, "pp_modalities") or {})[m]
        self.shaped[m] = (mod.field(input_cfg), preprocess.parse_pp(pp, key=mod.kind),
                          preprocess.output_shape(pp))
    self.fields = {m: modalities_lib.get(m).field(input_cfg) for m in ("image", "text")
                   if m in names}
    if "image" in self.fields:
      size = preprocess.image_size(pp_image)
      if size is None:
        raise ValueError(f"input.modalities={self.modalities} makes the image optional, so it "
                         f"needs a fixed size, but pp_image {pp_image!r} keeps the source's; "
                         "end it with resize(S) or a crop.")
      self.image_shape = tuple(size) + (3,)
    tokenize = [o for o in self.pp.ops if o.name == "tokenize"]
    self.text_len = tokenize[-1].args[0] if tokenize else 0
    if "text" in self.fields and not tokenize:
      raise ValueError("input.modalities has 'text', but the pp has no tokenize op; set "
                       "input.tokenizer (or input.pp_text ending in tokenize(text_len)).")

  def _load_binding(self, record, index: int, rng: np.random.Generator) -> dict[str, Any]:
    """Binding mode: every listed modality, zeros with "{m}_present" 0 where the record
    lacks it (absent or None); a record with none of them is bad (missing_field), as is one
    whose present value is (the reasons of its ops)."""
    example = {key: record.get(field) for key, field in self.fields.items()}
    out, ctx = {}, preprocess.Context(self.pp.tokenizer)
    try:
      values, counts = self.pp(example, rng, optional=(preprocess.IMAGE, preprocess.TEXT),
                               ctx=ctx)
      for m, (field, ops, shape) in self.shaped.items():
        value = record.get(field)
        if value is not None:
          values[m] = np.asarray(preprocess.apply_pp(ops, value, rng, ctx), np.float32)
          if values[m].shape != shape:  # An op after the shape-fixing one changed it.
            raise ValueError(f"input.pp_modalities[{m!r}] made shape {values[m].shape}, not "
                             f"its declared {shape}: an op after the one fixing the shape "
                             "must keep it.")
    except preprocess.BadRecord as e:
      return {_SKIP: e.reason, "_detail": str(e), "_index": index}
    if not values:
      return {_SKIP: "missing_field", "_index": index,
              "_detail": f"none of {list(self.modalities)} in the record ({sorted(record)})"}
    for m in list(self.fields) + list(self.shaped):
      mod = modalities_lib.get(m)
      if m == "image" and values.get(m) is not None:
        out.update(image_outputs(values[m], self.uint8))
      elif m in values:
        out[mod.batch_key] = np.asarray(values[m], mod.dtype)
      else:
        shape = (self.shaped[m][2] if m in self.shaped else
                 self.image_shape if m == "image" else (self.text_len,))
        out[mod.batch_key] = np.zeros(shape, np.uint8 if m == "image" and self.uint8 else
                                      mod.dtype)
      out[modalities_lib.present_key(m)] = np.int32(m in values)
    if self.keep_label and self.label_key in record:
      out["label"] = np.asarray(record[self.label_key], np.int32)
    if any(counts.values()):
      out["_counts"] = dict(counts)
    return out

  def _init_boxes(self, input_cfg) -> None:
    self.box_text_key = _get(input_cfg, "box_text_column")
    self.max_boxes = int(_get(input_cfg, "max_boxes", 0) or 0)
    self.box_text_len = int(_get(input_cfg, "box_text_len", 0) or 0)
    if (not self.box_text_key or self.max_boxes < 1 or self.box_text_len < 1
        or self.pp.tokenizer is None or self.modalities):
      raise ValueError(f"input.box_column={self.box_key!r} needs input.box_text_column (got "
                       f"{self.box_text_key!r}), input.max_boxes >= 1 (got {self.max_boxes}), "
                       f"input.box_text_len >= 1 (got {self.box_text_len}), input.tokenizer "
                       f"and no input.modalities.")
    boxes_lib.check_pp([o.name for o in self.pp.ops])
    fields = _source_fields(self.source)
    missing = [k for k in (self.box_key, self.box_text_key) if fields is not None
               and k not in fields]
    if missing:
      raise ValueError(f"input.box_column / box_text_column name {missing}, which the records "
                       f"lack; their fields: {sorted(fields)}.")
    # The box texts get the caption's text ops (lowercase, ...) but choose_caption / tokenize.
    self.box_text_ops = [o for o in self.pp.ops if o.key == preprocess.TEXT
                         and o.name not in ("choose_caption", "tokenize")]

  def _run_pp_with_boxes(self, record, rng):
    """The pp of an example with boxes: its image ops first (giving the geometry), then its
    text ops on the caption, left / right swapped when the image was flipped (boxes.py); the
    same draws as one pp call. -> (values, counts, boxes, box_text)."""
    ctx = preprocess.Context(self.pp.tokenizer)
    values, counts = self.pp({preprocess.IMAGE: record.get(self.image_key)}, rng,
                             optional=self.optional + (preprocess.TEXT,), ctx=ctx)
    geometry = ctx.geometry
    if geometry is None:
      raise ValueError(f"pp {self.pp.pp!r} moved the image's pixels in a way the boxes cannot "
                       f"follow (input.box_column); remove randaugment.")
    text = record.get(self.text_key)
    if text is not None and geometry.flipped:
      text = [boxes_lib.swap_left_right(c) for c in preprocess.captions(text)]
    # Its counts land in ctx.counts, which `counts` is.
    text_values, _ = self.pp({preprocess.TEXT: text}, rng,
                             optional=self.optional + (preprocess.IMAGE,), ctx=ctx)
    values.update(text_values)
    try:
      parsed, texts = boxes_lib.parse(record.get(self.box_key), record.get(self.box_text_key))
    except boxes_lib.BadBoxes as e:
      raise preprocess.BadRecord("bad_boxes", str(e)) from None

    def tokenize(texts):
      texts = [preprocess.apply_pp(self.box_text_ops, [t], rng, ctx)[0] for t in texts]
      return self.pp.tokenizer.encode_with_info(texts, self.box_text_len)

    boxes, box_text, box_counts = boxes_lib.to_batch(parsed, texts, geometry,
                                                     max_boxes=self.max_boxes, tokenize=tokenize)
    counts.update(box_counts)
    return values, counts, boxes, box_text

  def load(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
    try:
      record = self.source[index]
    except preprocess.BadRecord as e:  # The source's own check (a tar key without image).
      return {_SKIP: e.reason, "_detail": str(e), "_index": index}
    except Exception as e:  # A corrupt record in the file.
      return {_SKIP: "read", "_detail": f"{type(e).__name__}: {e}", "_index": index}
    if self.binding:
      return self._load_binding(record, index, rng)
    if self.modalities:
      return self._load_modalities(record, index, rng)
    try:
      if self.box_key:
        values, counts, boxes, box_text = self._run_pp_with_boxes(record, rng)
      else:
        values, counts = self.pp({preprocess.IMAGE: record.get(self.image_key),
                                  preprocess.TEXT: record.get(self.text_key)},
                                 rng, optional=self.optional)
    except preprocess.BadRecord as e:
      return {_SKIP: e.reason, "_detail": str(e), "_index": index}
    out = image_outputs(values[preprocess.IMAGE], self.uint8)
    if self.box_key:
      out["boxes"], out["box_text"] = boxes, box_text
    if self.prefix_key:
      try:
        out["prefix"], truncated = _tokenize_prefix(
            self.pp.tokenizer, record.get(self.prefix_key), self.prefix_len)
      except preprocess.BadRecord as e:
        return {_SKIP: e.reason, "_detail": f"prefix: {e}", "_index": index}
      counts["prefix_truncated"] += int(truncated)
    if preprocess.TEXT in values:
      out["text"] = np.asarray(values[preprocess.TEXT], np.int32)
    if self.keep_label and self.label_key in record:
      out["label"] = np.asarray(record[self.label_key], np.int32)
    if any(counts.values()):
      out["_counts"] = dict(counts)
    return out

  def _load_modalities(self, record, index: int, rng: np.random.Generator) -> dict[str, Any]:
    """input.modalities: "image" and each listed modality; an optional one the record lacks
    (None / absent) is zeros with "{m}_present" 0. Dense maps: see dense.py. Token codes
    (kind CODES) are required: int32 [N] as stored, or the record is bad (missing_codes,
    bad_codes)."""
    example = {preprocess.IMAGE: record.get(self.image_key)}
    example.update({m: record.get(f) for m, f in self.fields.items()})
    try:
      codes = {m: _check_codes(record.get(f), m, n) for m, (f, n) in self.codes.items()}
      values, counts = self.joint(example, rng, optional=(preprocess.TEXT,))
    except preprocess.BadRecord as e:
      return {_SKIP: e.reason, "_detail": str(e), "_index": index}
    out = image_outputs(values[preprocess.IMAGE], self.uint8)
    for m, value in codes.items():
      out[modalities_lib.get(m).batch_key] = value
      out[modalities_lib.present_key(m)] = np.int32(1)
    hw = out["image"].shape[:2]
    for m in self.fields:
      mod = modalities_lib.get(m)
      out[mod.batch_key] = (np.asarray(values[m], mod.dtype) if m in values else
                            np.zeros(mod.example_shape(hw, self.text_len), mod.dtype))
      out[modalities_lib.present_key(m)] = np.int32(m in values)
    if self.keep_label and self.label_key in record:
      out["label"] = np.asarray(record[self.label_key], np.int32)
    if any(counts.values()):
      out["_counts"] = dict(counts)
    return out


def image_outputs(image, uint8: bool = False) -> dict[str, np.ndarray]:
  """The batch entries of a processed image: "image" float32 [H, W, 3] (uint8 with `uint8`:
  the pp has keep_uint8), or for NaFlex patches (the naflex op) "image" [N, p*p*3] (same
  dtypes), "image_mask" [N] and "image_shape" [2]."""
  dtype = np.uint8 if uint8 else np.float32
  if isinstance(image, preprocess.Patches):
    return {"image": np.asarray(image.data, dtype),
            modalities_lib.mask_key("image"): image.mask,
            modalities_lib.shape_key("image"): image.shape}
  return {"image": np.asarray(image, dtype)}


def _check_codes(value, name: str, length: int) -> np.ndarray:
  """A record's token codes -> int32 [length]; BadRecord when absent (missing_codes) or not
  `length` integers in [0, 2**31) (bad_codes)."""
  if value is None:
    raise preprocess.BadRecord("missing_codes", f"the record has no {name!r} token codes")
  arr = np.asarray(value)
  if arr.shape != (length,) or arr.dtype.kind not in "iu":
    raise preprocess.BadRecord("bad_codes", f"{name} of shape {arr.shape} and dtype "
                                            f"{arr.dtype}; want {length} integers (its dataset's "
                                            f"code count)")
  if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
    raise preprocess.BadRecord("bad_codes", f"{name} codes in [{arr.min()}, {arr.max()}]; "
                                            f"want non-negative int32")
  return arr.astype(np.int32)


def _field_shapes(source, field: str) -> set[tuple[int, ...]]:
  """Shapes of `field` in a source's records: its TFDS feature's, every mixture part's, else
  the first readable record's that has it (empty: none of the first 10)."""
  if isinstance(source, sources.TfdsSource):
    info = sources._info(source.name, source.data_dir)  # pylint: disable=protected-access
    return {tuple(getattr(info.features[field], "shape", ()))}
  if isinstance(source, files.SliceSource):
    return _field_shapes(source.source, field)
  if isinstance(getattr(source, "sources", None), list):  # A mixture / language-sampled.
    return set().union(*(_field_shapes(s, field) for s in source.sources))
  for i in range(min(10, len(source))):
    try:
      value = source[i].get(field)
    except Exception:  # pylint: disable=broad-except  (a bad record: try the next)
      continue
    if value is not None:
      return {np.shape(value)}
  return set()


def _codes_length(source, field: str, name: str) -> int:
  """N of token modality `name` read from `field`: the one [N] shape its records have."""
  shapes = _field_shapes(source, field)
  if len(shapes) != 1 or len(next(iter(shapes))) != 1:
    raise ValueError(f"input.modalities names {name!r}, token codes read from field {field!r}, "
                     f"whose records hold shapes {sorted(shapes)}; it needs one int32 [N] per "
                     f"record, the same N in every source (tools/tokenize_dataset.py writes "
                     f"such datasets).")
  return int(next(iter(shapes))[0])


def _source_fields(source) -> set[str] | None:
  """Field names of a source's records: a TFDS dataset's features, the union over a
  mixture's parts, else the first readable record's keys (None: none of the first 10)."""
  if isinstance(source, sources.TfdsSource):
    info = sources._info(source.name, source.data_dir)  # pylint: disable=protected-access
    return set(info.features.keys())
  if isinstance(source, files.SliceSource):
    return _source_fields(source.source)
  if isinstance(getattr(source, "sources", None), list):  # A mixture / language-sampled.
    parts = [_source_fields(s) for s in source.sources]
    return None if None in parts else set().union(*parts)
  for i in range(min(10, len(source))):
    try:
      return set(source[i])
    except Exception:  # pylint: disable=broad-except  (a bad record: try the next)
      continue
  return None


def binding_mode(input_cfg) -> bool:
  """True when input.modalities lists a modality shaped by its own pp (audio, points, vec_*):
  every listed modality is then optional, with its "{m}_present" flag (see _load_binding)."""
  return any(modalities_lib.get(m).kind in modalities_lib.PP_SHAPED
             for m in _get(input_cfg, "modalities") or ())


def _parts(source) -> list:
  """A mixture's parts (each unwrapped from language sampling / slicing), else [source]."""
  if isinstance(source, files.SliceSource):
    return _parts(source.source)
  if isinstance(getattr(source, "sources", None), list):
    return [p for s in source.sources for p in _parts(s)]
  return [source]


def check_modalities(source, input_cfg, data) -> None:
  """ValueError if input.modalities names a modality whose field `data`'s records lack (in
  binding mode: a listed modality no part has, or a part with none of them)."""
  modalities = _get(input_cfg, "modalities")
  fields = _source_fields(source) if modalities else None
  if fields is None:
    return
  have = [name for name, mod in modalities_lib.MODALITIES.items()
          if mod.field(input_cfg) in fields]
  if binding_mode(input_cfg):
    wanted = {mod.field(input_cfg) for mod in map(modalities_lib.get, modalities)}
    for part in _parts(source):
      part_fields = _source_fields(part)
      if part_fields is not None and not part_fields & wanted:
        raise ValueError(f"input.modalities={tuple(modalities)} (fields {sorted(wanted)}): a "
                         f"source of {data!r} has none of them (its fields: "
                         f"{sorted(part_fields)}); drop it from input.data or point "
                         "input.columns at its fields.")
  for m in modalities:
    mod = modalities_lib.get(m)
    if mod.field(input_cfg) not in fields:
      column = mod.column_key or f"columns[{m!r}]"
      raise ValueError(
          f"input.modalities names {m!r} (field {mod.field(input_cfg)!r}) but dataset {data!r} "
          f"has fields {sorted(fields)}; its modalities: {', '.join(have) or 'none'}. Drop "
          f"{m!r} from input.modalities or point input.{column} at the right field.")


class _TrainElement:
  """Local stream position k -> processed example of this process's endless stream."""

  def __init__(self, example: _Example, n: int, seed: int, shuffle: bool,
               process_index: int, process_count: int):
    self.example, self.n, self.seed, self.shuffle = example, n, seed, shuffle
    self.p, self.pc = process_index, process_count

  def position(self, k: int) -> tuple[int, int]:
    """-> (epoch, example index) of local stream position k."""
    epoch, pos = divmod(int(k) * self.pc + self.p, self.n)
    if self.shuffle and self.n > 1:
      pos = int(grain.experimental.index_shuffle(
          pos, max_index=self.n - 1, seed=_u32(self.seed, epoch), rounds=4))
    return epoch, pos

  def __call__(self, k: int):
    epoch, index = self.position(k)
    ex = self.example.load(index, _example_rng(self.seed, epoch, index))
    source = self.example.source
    ex[_PART] = source.source_of(index) if hasattr(source, "source_of") else 0
    return ex


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  out = {}
  for k in examples[0]:
    shapes = {e[k].shape for e in examples}
    if len(shapes) > 1:
      raise ValueError(f"Examples have different {k!r} shapes {sorted(shapes)}; the pp "
                       f"string must end in a fixed size (e.g. resize(224) or "
                       f"central_crop(224)).")
    out[k] = np.stack([e[k] for e in examples])
  return out


def _to_global(batch: dict[str, np.ndarray], sharding):
  import jax  # pylint: disable=g-import-not-at-top
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def _process_layout(global_batch_size, process_index, process_count):
  import jax  # pylint: disable=g-import-not-at-top
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pi < pc:
    raise ValueError(f"process_index={pi} must be in [0, process_count={pc})")
  if global_batch_size % pc:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={pc}")
  return pi, pc, global_batch_size // pc


def _check_sharding(sharding, pc):
  import jax  # pylint: disable=g-import-not-at-top
  if sharding is not None and pc != jax.process_count():
    raise ValueError(
        f"process_count={pc} differs from jax.process_count()={jax.process_count()}: "
        f"simulated processes can only produce local numpy batches (sharding=None).")


def _mark_flags_parsed():
  try:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
  except ImportError:
    pass


def _tokenizer(input_cfg):
  path = _get(input_cfg, "tokenizer")
  return tokenizer_lib.Tokenizer(path) if path else None


class TrainIterator:
  """Endless iterator of global batches with exact, JSON-serialisable state."""

  def __init__(self, input_cfg, *, global_batch_size: int, seed: int, sharding,
               process_index=None, process_count=None):
    self.process_index, self.process_count, self.local_batch_size = _process_layout(
        global_batch_size, process_index, process_count)
    _check_sharding(sharding, self.process_count)
    self.global_batch_size, self.seed, self.sharding = global_batch_size, int(seed), sharding
    name, split = _get(input_cfg, "data"), _get(input_cfg, "split", "train")
    source = sources.open_source(name, split, _get(input_cfg, "data_dir"),
                                 **sources.source_options(input_cfg))
    temperature, keep = _get(input_cfg, "language_temperature"), _get(input_cfg, "languages")
    if temperature is not None or keep is not None:  # Resampled / filtered by language.
      source = languages.sample_languages(source, _get(input_cfg, "language_column"),
                                          1.0 if temperature is None else temperature,
                                          str(name), keep=keep)
    self.language_source = source if hasattr(source, "language_of") else None
    self.num_examples = len(source)
    if self.num_examples == 0:
      raise ValueError(f"{name!r} split {split!r} is empty")
    check_modalities(source, input_cfg, name)
    self.part_names = (list(source.names) if hasattr(source, "source_of") else [str(name)])
    self.max_bad_fraction = float(_get(input_cfg, "max_bad_fraction", 0.5))
    if not 0 <= self.max_bad_fraction < 1:
      raise ValueError(f"input.max_bad_fraction={self.max_bad_fraction} must be in [0, 1) "
                       f"(0: stop at the first bad record).")
    self.drop_failing_parts = bool(_get(input_cfg, "drop_failing_parts", False))
    self._element = _TrainElement(
        _Example(source, input_cfg,
                 captions_per_example=int(_get(input_cfg, "captions_per_example", 1) or 1),
                 split_long_captions=bool(_get(input_cfg, "split_long_captions", False))),
        self.num_examples, self.seed, bool(_get(input_cfg, "shuffle", True)),
        self.process_index, self.process_count)
    prefetch = int(_get(input_cfg, "prefetch", 0) or 0)
    num_workers = int(_get(input_cfg, "num_workers", 0) or 0)
    num_threads = int(_get(input_cfg, "num_threads", 2) or 1)
    ds = grain.MapDataset.range(_MAX_STREAM).map(self._element)
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads,
        prefetch_buffer_size=max(prefetch * self.local_batch_size, num_threads, 1)))
    if num_workers > 0:
      _mark_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=num_workers,
          per_worker_buffer_size=max(prefetch * self.local_batch_size, 1)))
    self._ds = ds
    self._it = iter(ds)
    self._skipped: collections.Counter = collections.Counter()
    self._counts: collections.Counter = collections.Counter()
    self._step = 0
    # Per part: reads and bad records by reason in its current window of _BAD_WINDOW reads.
    self._windows = [{"reads": 0, "bad": collections.Counter()} for _ in self.part_names]
    self._dropped: set[int] = set()

  def __iter__(self):
    return self

  def next_local(self) -> dict[str, np.ndarray]:
    """The next batch of this process as numpy arrays (local_batch_size examples)."""
    examples = []
    while len(examples) < self.local_batch_size:
      ex = next(self._it)
      part = ex.pop(_PART)
      if part in self._dropped:
        self._skipped["part_dropped"] += 1
        continue
      self._count_read(part, ex)
      if _SKIP in ex:
        reason = ex[_SKIP]
        if not self._skipped[reason]:
          logging.warning("Skipping bad record %s of %r (%s); further ones are only counted "
                          "in stats().", ex.get("_index"), self.part_names[part],
                          ex.get("_detail"))
        self._skipped[reason] += 1
        continue
      self._counts.update(ex.pop("_counts", {}))
      examples.append(ex)
    self._step += 1
    return _stack(examples)

  def _count_read(self, part: int, ex: dict[str, Any]) -> None:
    """Counts a read of `part`; fails (or drops) it once its window holds too many bad ones."""
    window = self._windows[part]
    window["reads"] += 1
    if _SKIP in ex:
      window["bad"][ex[_SKIP]] += 1
      if sum(window["bad"].values()) > self.max_bad_fraction * _BAD_WINDOW:
        self._fail_part(part, ex.get("_detail"))
    if window["reads"] >= _BAD_WINDOW:
      self._windows[part] = {"reads": 0, "bad": collections.Counter()}

  def _fail_part(self, part: int, last_detail) -> None:
    """SourceFailed naming the part and what to check, or (input.drop_failing_parts) drops it."""
    name, window = self.part_names[part], self._windows[part]
    is_mixture = len(self.part_names) > 1
    bad = window["bad"]
    hint = "; ".join(_BAD_SOURCE_HINTS[r] for r, _ in bad.most_common()
                     if r in _BAD_SOURCE_HINTS) or "check its data and the input config"
    what = f"part {name!r} of the input.data mixture" if is_mixture else f"input.data {name!r}"
    problem = (f"{sum(bad.values())} of the last {window['reads']} records read from {what} "
               f"are bad (input.max_bad_fraction={self.max_bad_fraction:g} allows "
               f"{int(self.max_bad_fraction * _BAD_WINDOW)} per {_BAD_WINDOW}): "
               f"{dict(bad.most_common())}; last: {last_detail}. {hint[0].upper()}{hint[1:]}.")
    others = set(range(len(self.part_names))) - self._dropped - {part}
    if self.drop_failing_parts and others:
      logging.error("Dropping %s for the rest of the run (its slots are skipped as "
                    "'part_dropped'): %s", what, problem)
      self._dropped.add(part)
      return
    if self.drop_failing_parts and is_mixture:
      advice = "Every other part of the mixture was dropped already."
    elif is_mixture:
      advice = ("To train on the other parts without it, set input.drop_failing_parts=True; "
                "if this much bad data is expected, raise input.max_bad_fraction.")
    else:
      advice = "If this much bad data is expected, raise input.max_bad_fraction."
    raise SourceFailed(f"{problem} {advice}")

  def __next__(self):
    batch = self.next_local()
    return batch if self.sharding is None else _to_global(batch, self.sharding)

  def stats(self) -> dict[str, int]:
    """Skipped records by reason, {"skipped/<reason>": n}, and preprocessing counts of the
    examples used, e.g. {"text_truncated": n} (keys appear once non-zero)."""
    return {**{f"skipped/{k}": v for k, v in sorted(self._skipped.items())},
            **dict(sorted(self._counts.items()))}

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "step": self._step,
            "skipped": dict(self._skipped), "counts": dict(self._counts), "seed": self.seed,
            "process_index": self.process_index, "process_count": self.process_count,
            "global_batch_size": self.global_batch_size,
            "bad_windows": {name: {"reads": w["reads"], "bad": dict(w["bad"])}
                            for name, w in zip(self.part_names, self._windows)},
            "dropped_parts": [self.part_names[i] for i in sorted(self._dropped)]}

  def set_state(self, state: dict[str, Any]) -> None:
    for k in ("seed", "process_index", "process_count", "global_batch_size"):
      if k in state and state[k] != getattr(self, k):
        raise ValueError(f"Iterator state is for {k}={state[k]}, this iterator has "
                         f"{k}={getattr(self, k)}; data order would not resume exactly.")
    self._it.set_state(state["grain"])
    self._step = int(state.get("step", 0))
    self._skipped = collections.Counter(state.get("skipped", {}))
    self._counts = collections.Counter(state.get("counts", {}))
    windows = state.get("bad_windows", {})
    self._windows = [{"reads": int(windows[n]["reads"]),
                      "bad": collections.Counter(windows[n]["bad"])} if n in windows
                     else {"reads": 0, "bad": collections.Counter()} for n in self.part_names]
    self._dropped = {i for i, n in enumerate(self.part_names)
                     if n in state.get("dropped_parts", ())}

  @property
  def epoch(self) -> float:
    """Epochs consumed (approximate when records were skipped)."""
    return self._step * self.global_batch_size / self.num_examples

  def close(self):
    close = getattr(self._it, "close", None)
    if close:
      close()


def make_train_iterator(input_cfg, *, global_batch_size: int, seed: int, sharding,
                        process_index=None, process_count=None) -> TrainIterator:
  """Endless shuffled training batches; see the module docstring.

  `sharding`: a NamedSharding over the batch axes -> batches of global jax.Arrays; None
  -> this process's numpy batches. process_index/count default to jax's (override only
  to simulate other processes, with sharding=None).
  """
  return TrainIterator(input_cfg, global_batch_size=global_batch_size, seed=seed,
                       sharding=sharding, process_index=process_index,
                       process_count=process_count)


class _EvalElement:
  """Local position -> example (with mask 1), or padding/bad record (mask 0)."""

  def __init__(self, example: _Example, n, global_batch, local_batch, process_index, seed):
    self.example, self.n = example, n
    self.gb, self.lb, self.p, self.seed = global_batch, local_batch, process_index, seed
    self._template = None

  def index(self, k: int) -> int:
    step, j = divmod(int(k), self.lb)
    return step * self.gb + self.p * self.lb + j

  def template(self):
    if self._template is None:
      for i in range(self.n):
        ex = self.example.load(i, _example_rng(self.seed, 0, i))
        if _SKIP not in ex:
          self._template = {k: np.zeros_like(v) for k, v in ex.items() if k != "_counts"}
          break
      else:
        raise ValueError("Every example of the eval split is a bad record.")
    return self._template

  def __call__(self, k: int):
    i = self.index(k)
    if i >= self.n:
      return dict(self.template(), mask=np.int32(0), _pad=True)
    ex = self.example.load(i, _example_rng(self.seed, 0, i))
    if _SKIP in ex:
      return dict(self.template(), mask=np.int32(0), **{_SKIP: ex[_SKIP]})
    return dict(ex, mask=np.int32(1))


class EvalBatches:
  """Re-iterable, ordered, padded batches over a whole split, with a `mask` field.

  Global batch s holds examples [s*B, (s+1)*B) (process p the p-th contiguous chunk);
  positions past the end are zero padding with mask 0. Bad records also get mask 0
  and are counted in stats().
  """

  def __init__(self, input_cfg, split, batch_size, sharding, *, pp_image=None,
               process_index=None, process_count=None, captions=None):
    self.process_index, self.process_count, self.local_batch_size = _process_layout(
        batch_size, process_index, process_count)
    _check_sharding(sharding, self.process_count)
    self.batch_size, self.sharding = batch_size, sharding
    source = sources.open_source(_get(input_cfg, "data"), split, _get(input_cfg, "data_dir"),
                                 **sources.source_options(input_cfg))
    self.num_examples = len(source)
    check_modalities(source, input_cfg, _get(input_cfg, "data"))
    pp = pp_image or _get(input_cfg, "pp_image")
    self._element = _EvalElement(
        _Example(source, input_cfg, pp_image=pp, keep_label=True, captions=captions),
        self.num_examples, batch_size, self.local_batch_size, self.process_index,
        int(_get(input_cfg, "seed", 0) or 0))
    self.num_threads = int(_get(input_cfg, "num_threads", 2) or 1)
    self._skipped: collections.Counter = collections.Counter()

  def __len__(self) -> int:
    return -(-self.num_examples // self.batch_size)

  def iter_local(self) -> Iterator[dict[str, np.ndarray]]:
    self._skipped = collections.Counter()
    self._element.template()
    ds = grain.MapDataset.range(len(self) * self.local_batch_size).map(self._element)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                   prefetch_buffer_size=self.local_batch_size)))
    for _ in range(len(self)):
      examples = [next(it) for _ in range(self.local_batch_size)]
      for ex in examples:
        if _SKIP in ex:
          self._skipped[ex.pop(_SKIP)] += 1
        ex.pop("_pad", None)
        ex.pop("_counts", None)
      yield _stack(examples)

  def __iter__(self):
    for batch in self.iter_local():
      yield batch if self.sharding is None else _to_global(batch, self.sharding)

  def stats(self) -> dict[str, int]:
    return {f"skipped/{k}": v for k, v in sorted(self._skipped.items())}


def make_eval_batches(input_cfg, split: str, batch_size: int, sharding, **kwargs) -> EvalBatches:
  """All of `split` in order, padded to full batches, with `mask` (and `label`).

  Uses `pp_image=` if given, else input_cfg.pp_image (random ops then use a fixed
  per-example rng). kwargs: pp_image, process_index,
  process_count, captions (C: "text" is int32 [B, C, L], each example's first C captions
  tokenized, all-zero rows where it has fewer; retrieval's multi-caption protocol).
  """
  return EvalBatches(input_cfg, split, batch_size, sharding, **kwargs)
