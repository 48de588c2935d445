"""Distillation from a frozen teacher, a `Part` (objectives/part.py) of objective.name="siglip2":
the student's image-text embeddings learn from a towers model loaded from a checkpoint. SigLIP 2
(Tschannen et al. 2025, arXiv:2502.14786) distils its small models from a larger teacher
(there implicitly, through active data curation, ACID); this part gives the explicit
distillation losses computed from a teacher's forward pass on the same batch:

  distill_kind="logits"    open_clip's DistillClipLoss (src/open_clip/loss.py, used by
                           `--distill-model`): the cross-entropy between the teacher's and the
                           student's softmax over each row of the image-text logits of the
                           batch, averaged over both directions,
                             L = 1/2 [CE(T, S) + CE(T^T, S^T)],
                             CE(T, S) = -mean_i sum_j softmax(T_i)_j log_softmax(S_i)_j,
                           S = t_s za zb^T with the student's temperature t_s, T = t_t ya yb^T
                           with the teacher's own t_t (its logit scale). It is the KL divergence
                           plus the teacher's entropy (constant): the same gradients; the KL is
                           logged as `distill_kl`. A sigmoid teacher's bias b shifts a whole
                           row, which the softmax ignores.
  distill_kind="features"  the student's normalised embeddings against the teacher's, per
                           contrasted modality, averaged over modalities and examples:
                           "cosine" 1 - <z_s, z_t>, or "mse" |z_s - z_t|^2 (= 2 - 2 cos for unit
                           vectors); the embeddings must have the same dims (no projection).

The loss is over the global batch (B x B logits); the weighted term is distill_weight * L,
logged unweighted as `distill_loss`.

The teacher. `distill_workdir` (a big_mm run: its checkpoint `distill_step`, default the
newest) or `distill_path` (what big_mm.export.load_params reads: an HF SiglipModel / CLIPModel
or open_clip directory, a big_vision .npz), read by train.read_params, as config.init's sources
are. `distill_model`: the teacher's Towers kwargs (model.towers layout, out_dim, ...); None
takes them from the source: the run's stored config.json, or the HF / open_clip import's kwargs
(a .npz needs distill_model). The teacher's image size and text vocabulary must be the
student's (it sees the same batch).

Where the teacher lives: in the extra train state, extra["distill"] = its params, rather than
closed over by the step. So it is (a) sharded like the student's params where a leaf mirrors
one (same path and shape: a teacher of the student's architecture), replicated otherwise
(train.make_train_state's rule for extra state); (b) checkpointed, so a resumed run continues
with exactly the teacher it started with, even if the files changed since; (c) out of the
compiled step's constants (a closed-over teacher would be embedded in the HLO, up to its
2 GB proto limit). It enters the initial state by a host callback (jax.pure_callback), so the
init program does not embed it either. It is frozen: the loss sees it through stop_gradient
(the train step differentiates params only, and update_extra leaves it). It runs unrolled
(scan=False, no remat): a forward pass only, so scan would save compile time only, and XLA's
cost analysis counts an unrolled stack layer by layer; the compiled step's FLOPs
(tools/benchmark.py, both counts) therefore include the teacher's forward pass.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from big_mm import modalities as modalities_lib
from big_mm import sharding, tree_paths
from big_mm.objectives import base
from big_mm.objectives.part import Part

log = logging.getLogger("big_mm")

KINDS = ("logits", "features")
FEATURE_LOSSES = ("cosine", "mse")


def _soft_cross_entropy(teacher_logits, student_logits):
  """-mean_i sum_j softmax(teacher_i)_j log_softmax(student_i)_j (open_clip's dist_loss)."""
  target = jax.nn.softmax(teacher_logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(student_logits.astype(jnp.float32), -1),
                           axis=-1))


def logit_distill_loss(za, zb, t_student, ya, yb, t_teacher):
  """open_clip's DistillClipLoss distillation term (see the module docstring): za, zb the
  student's [B, D] embeddings, ya, yb the teacher's [B, D'], t_* the logit scales."""
  student = t_student * za @ zb.T
  teacher = t_teacher * ya @ yb.T
  return 0.5 * (_soft_cross_entropy(teacher, student) + _soft_cross_entropy(teacher.T, student.T))


def feature_distill_loss(student: Mapping[str, Any], teacher: Mapping[str, Any],
                         kind: str = "cosine"):
  """Mean over modalities and examples of 1 - cos (kind "cosine") or the squared distance
  ("mse") between the student's and the teacher's normalised embeddings {modality: [B, D]}."""
  losses = []
  for m, zs in student.items():
    zs, zt = zs.astype(jnp.float32), teacher[m].astype(jnp.float32)
    if kind == "cosine":
      losses.append(jnp.mean(1.0 - jnp.sum(zs * zt, axis=-1)))
    else:
      losses.append(jnp.mean(jnp.sum(jnp.square(zs - zt), axis=-1)))
  return sum(losses) / len(losses)


def _unrolled(kwargs: Mapping[str, Any]) -> dict:
  """Towers kwargs with every tower unscanned and without remat (forward only)."""
  kwargs = dict(kwargs)
  towers = {}
  for m, tower in dict(kwargs.get("towers") or {}).items():
    tower = dict(tower or {})
    tower["scan"], tower["remat_policy"] = False, "none"
    towers[m] = tower
  kwargs["towers"] = towers
  return kwargs


class Distillation(Part):
  """Distillation from a frozen teacher (see the module docstring)."""
  NAME = "distill"
  SETTINGS = dict(
      distill_weight=0.0,             # 0: off
      distill_workdir=None,           # a big_mm run (its checkpoint) ...
      distill_step=None,              # ... at this step (None: the newest)
      distill_path=None,              # or an export / foreign checkpoint (export.load_params)
      distill_model=None,             # the teacher's Towers kwargs (None: from the source)
      distill_kind="logits",          # "logits" (open_clip) | "features"
      distill_feature_loss="cosine",  # distill_kind="features": "cosine" | "mse"
  )

  @classmethod
  def check_settings(cls, s) -> None:
    weight = base.number("distill_weight", s["distill_weight"])
    if weight < 0:
      raise base.ConfigError(f"objective.distill_weight must be >= 0 (0: off), got {weight!r}.")
    base.choice("distill_kind", s["distill_kind"], KINDS)
    base.choice("distill_feature_loss", s["distill_feature_loss"], FEATURE_LOSSES)
    model = s["distill_model"]
    if model is not None and (not isinstance(model, Mapping) or not model.get("towers")):
      raise base.ConfigError(
          f"objective.distill_model must be the teacher's towers model kwargs, e.g. "
          f"dict(towers=dict(image=dict(variant='L/16'), text=dict(vocab_size=32000)), "
          f"out_dim=1024), or None (from the checkpoint); got {model!r}.")
    step = s["distill_step"]
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
      raise base.ConfigError(f"objective.distill_step must be a checkpoint step (int >= 0) or "
                             f"None (the newest), got {step!r}.")
    if not weight:
      return
    workdir, path = s["distill_workdir"], s["distill_path"]
    if bool(workdir) == bool(path):
      raise base.ConfigError(
          f"objective.distill_weight={weight} needs the teacher: set objective.distill_workdir "
          f"(a big_mm run) or objective.distill_path (an HF / open_clip directory or .npz), "
          f"one of them; got distill_workdir={workdir!r}, distill_path={path!r}.")
    if step is not None and not workdir:
      raise base.ConfigError("objective.distill_step picks a checkpoint of distill_workdir; "
                             "distill_path has no steps.")

  def __init__(self, objective, settings):
    super().__init__(objective, settings)
    s = settings
    self.weight = float(s["distill_weight"])
    if not self.weight:
      return
    self.kind, self.feature_loss = s["distill_kind"], s["distill_feature_loss"]
    self.workdir, self.path, self.step = s["distill_workdir"], s["distill_path"], s["distill_step"]
    self.source_key = "objective.distill_workdir" if self.workdir else "objective.distill_path"
    self.modalities = objective.modalities
    self._flat = None  # the checkpoint's params (host), read once
    kwargs = self._teacher_kwargs(s["distill_model"])
    from big_mm import models  # pylint: disable=g-import-not-at-top
    try:
      self.teacher = models.get_model("towers", **_unrolled(kwargs))
    except (TypeError, ValueError) as e:
      raise base.ConfigError(f"objective.distill_model (the teacher's towers kwargs): {e}") from e
    missing = [m for m in self.modalities if m not in self.teacher.towers]
    if missing:
      raise base.ConfigError(
          f"The teacher ({self.source_key}) has no tower for {missing}; the student contrasts "
          f"{list(self.modalities)}. Give a teacher with those towers (objective.distill_model).")
    self._check_against_student()

  @property
  def enabled(self) -> bool:
    return self.weight > 0

  # ----------------------------------------------------------------------- the teacher

  def _read(self) -> dict:
    if self._flat is None:
      from big_mm import train  # pylint: disable=g-import-not-at-top  (train imports objectives)
      # Read on the host even when first asked while tracing (init_extra under jit/eval_shape).
      with jax.ensure_compile_time_eval():
        self._flat, step = train.read_params(workdir=self.workdir, path=self.path,
                                             step=self.step, scan=False, key=self.source_key)
      self._flat = jax.tree.map(np.asarray, self._flat)
      log.info("distill: teacher from %s%s", self.workdir or self.path,
               "" if step is None else f" step {step}")
    return self._flat

  def _teacher_kwargs(self, given):
    if given is not None:
      return dict(given)
    if self.workdir:
      from big_mm import cli  # pylint: disable=g-import-not-at-top
      stored = cli.read_config(self.workdir)
      if stored is None:
        raise base.ConfigError(f"objective.distill_workdir={self.workdir!r} has no stored "
                               "config.json; give the teacher's towers kwargs in "
                               "objective.distill_model.")
      if stored.get("model_name") != "towers":
        raise base.ConfigError(
            f"objective.distill_workdir={self.workdir!r} is a {stored.get('model_name')!r} run; "
            "the teacher must be a towers model (contrastive, siglip2).")
      return stored.model.to_dict()
    from big_mm import export  # pylint: disable=g-import-not-at-top
    self._flat, kwargs = export.load_params(self.path, with_model_kwargs=True, scan=False)
    if kwargs is None:
      raise base.ConfigError(f"objective.distill_path={self.path!r} stores no architecture "
                             "(a .npz); give the teacher's towers kwargs in "
                             "objective.distill_model.")
    return kwargs

  def _example_inputs(self):
    example = base.zeros(base.modality_example(self.objective.ctx, self.modalities))
    return {m: modalities_lib.model_input(example, m) for m in self.modalities}

  def abstract_params(self):
    """The teacher's param shapes (nothing computed, nothing read)."""
    return sharding.unbox(jax.eval_shape(
        lambda: self.teacher.init(jax.random.key(0), self._example_inputs())["params"]))

  def _check_against_student(self):
    student = self.objective.model
    for m in self.modalities:
      if m == "text":
        want = dict(student.towers["text"] or {}).get("vocab_size")
        got = dict(self.teacher.towers["text"] or {}).get("vocab_size")
        if want != got:
          raise base.ConfigError(
              f"The teacher's text vocabulary ({got} pieces) is not the student's "
              f"(model.towers.text.vocab_size={want}): the teacher reads the same tokens.")
    if self.kind == "features":
      (zt, _) = jax.eval_shape(lambda: self.teacher.init_with_output(
          jax.random.key(0), self._example_inputs()))[0]
      dims = self.objective.embedding_dims()
      differ = {m: (dims[m], zt[m].shape[-1]) for m in self.modalities
                if dims[m] != zt[m].shape[-1]}
      if differ:
        raise base.ConfigError(
            f"objective.distill_kind='features' compares embeddings of the same size, but "
            f"(student, teacher) dims are {differ}; set model.out_dim to the teacher's, or "
            "use distill_kind='logits'.")

  def teacher_params(self) -> dict:
    """The teacher's params (host numpy tree shaped as `abstract_params()`), checked."""
    flat = self._read()
    abstract = tree_paths.flat_dict(self.abstract_params())
    missing = sorted(set(abstract) - set(flat) - {"b"})
    if missing:
      raise base.ConfigError(
          f"The teacher ({self.source_key}) lacks {len(missing)} params of the model "
          f"objective.distill_model describes, e.g. {missing[:4]}; it has e.g. "
          f"{sorted(flat)[:4]}. Fix objective.distill_model.")
    out = {}
    for name, want in abstract.items():
      value = flat.get(name)
      if value is None:  # CLIP checkpoints have no bias b; a softmax row ignores it anyway
        value = np.zeros(want.shape, want.dtype)
      if tuple(value.shape) != tuple(want.shape):
        raise base.ConfigError(
            f"Teacher param {name!r} has shape {tuple(value.shape)} in {self.workdir or self.path!r}"
            f" but {tuple(want.shape)} in objective.distill_model's model.")
      out[name] = np.asarray(value, want.dtype)
    from big_mm.export import unflatten  # pylint: disable=g-import-not-at-top
    return unflatten(out)

  # ----------------------------------------------------------------------- Part API

  def init_extra(self, params):
    del params
    host = self.teacher_params()  # read and checked at trace time
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), host)
    return jax.pure_callback(lambda: host, abstract)

  def teacher_forward(self, teacher, inputs):
    """The teacher's (z {modality: [B, D]}, out) on the student's inputs, no gradient."""
    teacher = jax.lax.stop_gradient(teacher)
    z, out = self.teacher.apply({"params": teacher},
                                {m: inputs[m] for m in self.modalities}, train=False)
    return jax.lax.stop_gradient(z), jax.lax.stop_gradient(out)

  def loss(self, params, batch, rng, fwd, *, extra, step):
    del params, batch, rng, step
    zs = {m: fwd["z"][m] for m in self.modalities}
    if any(z.ndim != 2 for z in zs.values()):
      raise ValueError("objective.distill_weight: teacher distillation takes one caption per "
                       "image (input.captions_per_example=1).")
    zt, out_t = self.teacher_forward(extra, fwd["inputs"])
    a, b = self.modalities
    metrics = {}
    if self.kind == "logits":
      loss = logit_distill_loss(zs[a], zs[b], fwd["out"]["t"], zt[a], zt[b], out_t["t"])
      # The KL divergence: the cross-entropy less the teacher's entropy (0 when matched).
      metrics["distill_kl"] = loss - logit_distill_loss(zt[a], zt[b], out_t["t"], zt[a], zt[b],
                                                        out_t["t"])
    else:
      loss = feature_distill_loss(zs, zt, self.feature_loss)
    metrics["distill_loss"] = loss
    return self.weight * loss, metrics
