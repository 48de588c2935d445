"""Shared evaluator plumbing: the keys every evaluator takes, the context evaluators are built
with, the Evaluator base class, and iterating / embedding a whole held-out split, in order,
under the mesh, gathering the results to every process."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from big_mm import config as config_lib
from big_mm import modalities
from big_mm import sharding
from big_mm.input import pipeline

# The keys of every evaluator type (each type's DEFAULTS add its own). An evaluator runs every
# every_steps|epochs|examples and at the end; none given: only at the end; every_steps=0: never.
# data / pp_image / image_column / text_column override input's for the eval split
# (eval_input_config); e.g. text_column="captions/text" for coco_captions. naflex_lengths
# (N1, N2, ...): with a pp_image ending in naflex(N, p), evaluate at each sequence length Ni
# instead (one run, metrics suffixed "@n{Ni}"), e.g. (64, 144, 256) as SigLIP 2 reports.
DEFAULTS = dict(type=None, split="test", batch_size=256, every_steps=None, every_epochs=None,
                every_examples=None, pp_image=None, data=None, image_column=None,
                text_column=None, naflex_lengths=())


def eval_input_config(config, ev):
  """The training input config with the evaluator's overrides (data, pp_image, image_column,
  text_column). With its own data, input's column names (which describe the training data)
  do not carry over."""
  input_cfg = config.input.copy_and_resolve_references()
  with input_cfg.unlocked(), input_cfg.ignore_type():  # A mixture's data may become one name.
    if ev.get("data"):
      input_cfg.data = ev.data
      input_cfg.image_column = input_cfg.text_column = None
    for column in ("image_column", "text_column"):
      if ev.get(column):
        input_cfg[column] = ev[column]
    if ev.get("pp_image"):
      input_cfg.pp_image = ev.pp_image
    input_cfg.split = ev.split
  return input_cfg


def round_batch(batch_size: int, mesh) -> int:
  shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh)) * jax.process_count()
  return max(shards, math.ceil(batch_size / shards) * shards)


def iterate_split(input_cfg, batch_size: int, mesh, **options):
  """Yields (global batch, bool [B] host mask of real rows) over all of input_cfg.split.
  options: make_eval_batches' (captions)."""
  for batch in pipeline.make_eval_batches(input_cfg, input_cfg.split,
                                          round_batch(batch_size, mesh),
                                          sharding.batch_sharding(mesh), **options):
    yield batch, np.asarray(gather(batch["mask"])).astype(bool)


def jit_method(objective, mesh, method: str):
  """jax.jit(objective.<method>) with batch-sharded outputs."""
  fn = getattr(objective, method, None)
  if fn is None:
    raise TypeError(f"{type(objective).__name__} has no {method}(), which this evaluator needs. "
                    "zeroshot / retrieval need an embedding objective (contrastive, coca); for "
                    "generative objectives use the 'scoring' / 'captioning' evaluators.")
  return jax.jit(fn, out_shardings=sharding.batch_sharding(mesh))


class Embedder:
  """Jitted image / text embedding functions bound to a mesh (built once per run; each is
  compiled on first use, so objectives without embeddings can still build one)."""

  def __init__(self, objective, mesh):
    self.objective, self.mesh = objective, mesh
    self._jitted = {}

  def _method(self, method: str):
    if method not in self._jitted:
      self._jitted[method] = jit_method(self.objective, self.mesh, method)
    return self._jitted[method]

  @property
  def embed_images(self):
    return self._method("embed_images")

  @property
  def embed_texts(self):
    return self._method("embed_texts")

  def embed(self, modality: str):
    """Jitted fn(params, x) = objective.embed(params, modality, x): any tower's embedding."""
    key = f"embed/{modality}"
    if key not in self._jitted:
      embed = getattr(self.objective, "embed", None)
      if not callable(embed):
        raise TypeError(f"{type(self.objective).__name__} has no embed(params, modality, x), "
                        f"which evaluating {modality!r} needs: use an objective with a tower "
                        "per modality (contrastive, binding).")
      self._jitted[key] = jax.jit(lambda params, x: embed(params, modality, x),
                                  out_shardings=sharding.batch_sharding(self.mesh))
    return self._jitted[key]

  def texts(self, params, tokens: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeds host int32 tokens [N, L] in padded, sharded batches; returns [N, D]."""
    batch_size = round_batch(batch_size, self.mesh)
    out = []
    for start in range(0, len(tokens), batch_size):
      chunk = tokens[start:start + batch_size]
      padded = np.zeros((batch_size,) + tokens.shape[1:], tokens.dtype)
      padded[:len(chunk)] = chunk
      # Every process holds the same prompts: each takes its own devices' rows.
      arr = jax.make_array_from_callback(padded.shape, sharding.batch_sharding(self.mesh),
                                         lambda index: padded[index])
      out.append(gather(self.embed_texts(params, arr))[:len(chunk)])
    return np.concatenate(out)

  def split(self, params, input_cfg, batch_size: int, *, images=True, texts=True,
            captions: int | None = None):
    """Embeds a whole split in order: dict with zimg, ztxt, label (where present).

    captions=C: ztxt embeds the first C captions of every example (all of them when it has
    fewer), grouped by example, and "caption_owner" [M] holds each one's example row.
    """
    parts = {"zimg": [], "ztxt": [], "label": []}
    options = {"captions": captions} if captions else {}
    for batch, mask in iterate_split(input_cfg, batch_size, self.mesh, **options):
      if texts and "text" not in batch:
        raise ValueError(
            f"Split {input_cfg.split!r} of {input_cfg.data!r} has no text field: name the "
            f"caption feature with the evaluator's text_column (e.g. 'captions/text' for "
            f"coco_captions).")
      if images:
        image_input = modalities.model_input(batch, "image")  # with NaFlex's mask and shape
        parts["zimg"].append(gather(self.embed_images(params, image_input))[mask])
      if texts:
        # Every-caption tokens go to the host; only real captions are embedded.
        text = gather(batch["text"]) if captions else self.embed_texts(params, batch["text"])
        parts["ztxt"].append(gather(text)[mask])
      if "label" in batch:
        parts["label"].append(gather(batch["label"])[mask])
    out = {k: np.concatenate(v) for k, v in parts.items() if v}
    if texts and captions:
      real = np.any(out["ztxt"] != 0, axis=-1)  # [N, C]: all-zero rows are padding.
      out["caption_owner"] = np.nonzero(real)[0]
      out["ztxt"] = self.texts(params, out["ztxt"][real], batch_size)
    return out


def matryoshka_dims(context, full_dim: int) -> tuple[int, ...]:
  """The objective's Matryoshka prefix dims (objective.matryoshka_dims) below the embedding's
  full dim `full_dim`, whose metrics keep their plain names; () without MRL."""
  return tuple(d for d in getattr(context.objective, "matryoshka_dims", ()) if d < full_dim)


def matryoshka_prefix(z: np.ndarray, dim: int) -> np.ndarray:
  """The first `dim` features of host embeddings z [N, D], re-normalised (as the MRL loss
  sees them); metrics at that dim are named with the suffix `@d{dim}`."""
  z = np.asarray(z[..., :dim], np.float32)
  return z / np.sqrt(np.maximum(np.sum(z * z, axis=-1, keepdims=True), 1e-12))


def own_similarity(context) -> bool:
  """True where the objective scores image-text pairs itself (FILIP's token-wise similarity,
  `objective.similarity(zimg, ztxt, direction)` on the token features its embed fns give):
  the zeroshot and retrieval evaluators then use it instead of the dot product, and log so."""
  return callable(getattr(context.objective, "similarity", None))


def scores(context, zimg: np.ndarray, ztxt: np.ndarray, direction: str = "img2txt"):
  """[Ni, Nt] image-text scores: the objective's own similarity (own_similarity; direction
  "img2txt" or "txt2img" picks FILIP's image->text or text->image one), else zimg @ ztxt.T."""
  if own_similarity(context):
    return context.objective.similarity(zimg, ztxt, direction)
  return zimg @ ztxt.T


def gather(x):
  """A global array as one host numpy array (all processes get all of it)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


@dataclasses.dataclass
class EvalContext:
  """What every evaluator of a run is built with (once per run, by big_mm.evaluators.build)."""
  config: Any  # the run's config: input.* describes the training data
  mesh: jax.sharding.Mesh
  objective: Any
  tokenizer: Any = None  # big_mm.input.tokenizer.Tokenizer; None without input.tokenizer
  # Shared by the embedding evaluators, so each embedding function compiles once per run.
  embedder: Embedder = dataclasses.field(init=False)

  def __post_init__(self):
    self.embedder = Embedder(self.objective, self.mesh)


class Evaluator:
  """An evaluator type: DEFAULTS (its config keys, with defaults), validate (the values'
  checks, before any compute) and the evaluation. Built once per run, so per-run state
  (jitted functions, cached data) lives on the object; calling it with the params returns
  its metrics keyed `eval/{name}/{metric}`."""
  DEFAULTS = DEFAULTS

  def __init__(self, name: str, ev, context: EvalContext):
    self.name, self.ev, self.context = name, ev, context
    self.input_cfg = eval_input_config(context.config, ev)
    self.naflex_inputs = naflex_variants(name, self.input_cfg, ev.get("naflex_lengths") or ())

  @staticmethod
  def validate(name: str, ev: dict) -> None:
    """Raises ConfigError for a bad value of evals.{name} (ev: its keys, defaults filled in)."""
    del name, ev

  def evaluate(self, params) -> dict[str, float]:
    raise NotImplementedError

  def __call__(self, params) -> dict[str, float]:
    if not self.naflex_inputs:
      return {f"eval/{self.name}/{k}": v for k, v in self.evaluate(params).items()}
    out, input_cfg = {}, self.input_cfg
    try:
      for length, self.input_cfg in self.naflex_inputs.items():
        out.update({f"eval/{self.name}/{k}@n{length}": v
                    for k, v in self.evaluate(params).items()})
    finally:
      self.input_cfg = input_cfg
    return out


def naflex_variants(name: str, input_cfg, lengths) -> dict[int, Any]:
  """{N: input_cfg with its pp_image's naflex op at sequence length N} (evals.{name}.
  naflex_lengths); ConfigError when the pp does not end with naflex or a length is bad."""
  if not lengths:
    return {}
  ops = input_cfg.pp_image.split("|")
  if not ops[-1].strip().startswith("naflex"):
    raise config_lib.ConfigError(
        f"evals.{name}.naflex_lengths={tuple(lengths)} needs an image pp ending in "
        f"naflex(N, patch_size); its pp_image is {input_cfg.pp_image!r}.")
  from big_mm.input import preprocess  # pylint: disable=g-import-not-at-top
  patch_size = preprocess.parse_pp(ops[-1], preprocess.IMAGE)[0].args[1]
  variants = {}
  for length in lengths:
    int_at_least(f"evals.{name}.naflex_lengths entry", length, 1)
    cfg = input_cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.pp_image = "|".join(ops[:-1] + [f"naflex({length}, {patch_size})"])
    variants[length] = cfg
  return variants


def int_at_least(key: str, value, smallest: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
    raise config_lib.ConfigError(f"{key} must be an integer >= {smallest}, got {value!r}.")
