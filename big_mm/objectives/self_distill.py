"""SigLIP 2's self-distillation and masked prediction (Tschannen et al., 2025, arXiv:2502.14786,
section 2.3), a `Part` (objectives/part.py) of objective.name="siglip2": from
`self_distill_start_fraction` of training on, an EMA teacher of the image tower distils into the student through

  SILC (Naeem et al., 2024, arXiv:2310.13355): local-to-global consistency. The student sees
    `self_distill_local_crops` local crops of each image, the teacher the whole image (the
    global view); a DINO head on each one's pooled image features, softmax cross-entropy
    between the teacher's centred, sharpened distribution and the student's (DINO, Caron et
    al., 2021). Weight `silc_weight`.
  TIPS (Maninis et al., 2024, arXiv:2410.16512): masked prediction. The student sees the image
    with `tips_mask_ratio` of its patch embeddings replaced by a learned mask token, the teacher
    the image itself; the same loss per patch (a second head, its own centre), at the masked
    positions only (iBOT, Zhou et al., 2022). Weight `tips_weight`.

What comes from where:
  SigLIP 2 sec. 2.3: the losses join for the last 20% of training (start_fraction 0.8), the
    teacher starting as the student's params then, the heads and mask token new; one global
    (teacher) view and 8 local (student) views; 50% of the student's embedded patches masked,
    student and teacher seeing the same global view; the loss weights 1 (SILC) and 0.25 (TIPS),
    both scaled again by 0.25 / 0.5 / 1.0 / 0.5 for B / L / So400m / g; the image-text losses
    on the original image, the new ones on the extra views.
  SILC: local crops of 0.05-0.4 of the image area; a fixed EMA momentum (DINO's schedule to 1
    would stop the teacher from following the image-text loss).
  DINO: the head (3-layer MLP, hidden 2048, GELU, bottleneck 256, l2-normalised, then a
    weight-normalised linear layer without bias to 65536 outputs), student temperature 0.1,
    teacher temperature 0.04 (DINO warms it up to 0.07; fixed here), centre momentum 0.9, the
    teacher's base momentum 0.996 (the default EMA decay), local crops of 96 px for 224 px
    images (the default local_crop_size: 3/7 of the image side, down to a patch multiple).
  iBOT: the patch head's 8192 outputs, the patch centre a running mean over all patch tokens.
Not done: DINO's flips / colour jitter on the crops (crops are resized only); SigLIP 2's
per-size re-weighting is the user's choice of the two weights.

Before the start step both losses are 0 at no cost (one lax.cond: the extra forward passes run
only from the start on) and the teacher tracks the student (at the start it is the current
student); afterwards it is the EMA `decay * teacher + (1 - decay) * student` after each
update, and the centres follow the teacher's mean outputs of the steps with the loss on.
State: params["sd"] = the student's heads and "mask_token" (spliced into the ViT's params for
the masked pass: the image tower's own tree stays as it was), extra["self_distill"] =
{"teacher": {"img": EMA image tower, "sd": EMA heads}, "center": {"silc", "tips"}}.
The local crops are cut and resized on the device (jax.image.scale_and_translate, per example);
a crop's learned position embeddings are the stored ones bilinearly resized to its grid.
NaFlex patch inputs are refused (ConfigError): crops and patch masks need an image grid.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_mm import modalities as modalities_lib
from big_mm.models import layers
from big_mm.models.towers import l2_normalize
from big_mm.models.vit import ViT
from big_mm.objectives import base
from big_mm.objectives.part import Part

SCOPE = "sd"
LOSSES = ("silc", "tips")


class DinoHead(nn.Module):
  """DINO's projection head: MLP -> l2-normalised bottleneck -> weight-normalised linear layer
  (unit-norm columns, no bias) to `out_dim` logits."""
  out_dim: int
  hidden: int = 2048
  bottleneck: int = 256

  @nn.compact
  def __call__(self, x):
    dense = lambda d, name: nn.Dense(
        d, name=name, param_dtype=jnp.float32,
        kernel_init=layers.logical(nn.initializers.truncated_normal(0.02), (None, None)),
        bias_init=layers.logical(nn.initializers.zeros, (None,)))
    x = nn.gelu(dense(self.hidden, "mlp_0")(x), approximate=False)
    x = nn.gelu(dense(self.hidden, "mlp_1")(x), approximate=False)
    x = l2_normalize(dense(self.bottleneck, "bottleneck")(x))
    v = self.param("last", layers.logical(nn.initializers.truncated_normal(0.02), (None, None)),
                   (self.bottleneck, self.out_dim), jnp.float32)
    return x @ (v / jnp.linalg.norm(v, axis=0, keepdims=True))


def dino_cross_entropy(student_logits, teacher_logits, center, student_temp, teacher_temp):
  """-sum_k softmax((teacher - center) / teacher_temp) * log_softmax(student / student_temp),
  per position (the teacher without gradient)."""
  target = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits - center) / teacher_temp, -1)
  return -jnp.sum(target * jax.nn.log_softmax(student_logits / student_temp, -1), -1)


def local_boxes(rng, n, crops, image_hw, scale):
  """Random boxes (y0, x0, h, w) [n, crops, 4] in pixels, as RandomResizedCrop draws them:
  area a uniform in `scale` (fractions of the image), aspect ratio w/h log-uniform in
  [3/4, 4/3], clipped to the image, position uniform."""
  height, width = image_hw
  k_area, k_ratio, k_y, k_x = jax.random.split(rng, 4)
  area = jax.random.uniform(k_area, (n, crops), minval=scale[0], maxval=scale[1])
  ratio = jnp.exp(jax.random.uniform(k_ratio, (n, crops), minval=math.log(3 / 4),
                                     maxval=math.log(4 / 3)))
  h = jnp.clip(jnp.sqrt(area * height * width / ratio), 1.0, height)
  w = jnp.clip(jnp.sqrt(area * height * width * ratio), 1.0, width)
  y0 = jax.random.uniform(k_y, (n, crops)) * (height - h)
  x0 = jax.random.uniform(k_x, (n, crops)) * (width - w)
  return jnp.stack([y0, x0, h, w], axis=-1)


def crop_and_resize(images, boxes, size: int):
  """images [B, H, W, C], boxes [B, 4] (y0, x0, h, w) in pixels -> [B, size, size, C]: each
  box resampled to size x size (bilinear, antialiased when shrinking)."""
  def one(image, box):
    y0, x0, h, w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([size / h, size / w])
    return jax.image.scale_and_translate(
        image, (size, size, image.shape[-1]), (0, 1), scale, -jnp.stack([y0, x0]) * scale,
        method="linear", antialias=True)
  return jax.vmap(one)(images, boxes)


def random_patch_mask(rng, n, length, ratio):
  """bool [n, length]: round(ratio * length) positions of each row, drawn at random."""
  count = max(1, int(round(ratio * length)))
  scores = jax.random.uniform(rng, (n, length))
  kth = jnp.sort(scores, axis=-1)[:, count - 1:count]
  return scores <= kth


class SelfDistillation(Part):
  """SILC + TIPS self-distillation with an EMA teacher (see the module docstring)."""
  NAME = "self_distill"
  SETTINGS = dict(
      silc_weight=0.0,                      # SigLIP 2: 1 (x 0.25 / 0.5 / 1 / 0.5 by size); 0: off
      tips_weight=0.0,                      # SigLIP 2: 0.25 (x the same factors); 0: off
      self_distill_start_fraction=0.8,      # SigLIP 2: the last 20% of training
      self_distill_ema_decay=0.996,         # DINO's base momentum, fixed as in SILC
      self_distill_local_crops=8,           # SigLIP 2
      self_distill_local_crop_size=None,    # pixels; None: 3/7 of the image side (DINO 96/224)
      self_distill_local_crop_scale=(0.05, 0.4),  # SILC: fraction of the image area
      tips_mask_ratio=0.5,                  # SigLIP 2
      self_distill_head_hidden=2048,        # DINO
      self_distill_head_bottleneck=256,     # DINO
      silc_head_dim=65536,                  # DINO
      tips_head_dim=8192,                   # iBOT
      self_distill_student_temp=0.1,        # DINO / iBOT
      self_distill_teacher_temp=0.04,       # DINO / iBOT (their warm-up's start)
      self_distill_center_momentum=0.9,     # DINO / iBOT
  )

  @classmethod
  def check_settings(cls, s) -> None:
    for key in ("silc_weight", "tips_weight"):
      if base.number(key, s[key]) < 0:
        raise base.ConfigError(f"objective.{key} must be >= 0 (0: off), got {s[key]!r}.")
    unit = (("self_distill_start_fraction", False), ("self_distill_ema_decay", True),
            ("self_distill_center_momentum", True))
    for key, closed in unit:
      v = base.number(key, s[key])
      if not (0.0 <= v <= 1.0 if closed else 0.0 <= v < 1.0):
        raise base.ConfigError(f"objective.{key} must be in [0, 1{']' if closed else ')'}, "
                               f"got {v!r}.")
    ratio = base.number("tips_mask_ratio", s["tips_mask_ratio"])
    if not 0.0 < ratio < 1.0:
      raise base.ConfigError(f"objective.tips_mask_ratio must be in (0, 1), got {ratio!r}.")
    for key in ("self_distill_local_crops", "self_distill_head_hidden",
                "self_distill_head_bottleneck", "silc_head_dim", "tips_head_dim"):
      base.positive_int(key, s[key])
    if s["self_distill_local_crop_size"] is not None:
      base.positive_int("self_distill_local_crop_size", s["self_distill_local_crop_size"],
                        " (pixels) or None")
    scale = s["self_distill_local_crop_scale"]
    if (not isinstance(scale, (tuple, list)) or len(scale) != 2
        or not 0.0 < base.number("self_distill_local_crop_scale", scale[0])
        <= base.number("self_distill_local_crop_scale", scale[1]) <= 1.0):
      raise base.ConfigError(f"objective.self_distill_local_crop_scale must be (low, high) "
                             f"with 0 < low <= high <= 1 (fractions of the image area), got "
                             f"{scale!r}.")
    for key in ("self_distill_student_temp", "self_distill_teacher_temp"):
      if base.number(key, s[key]) <= 0:
        raise base.ConfigError(f"objective.{key} must be > 0, got {s[key]!r}.")

  def __init__(self, objective, settings):
    super().__init__(objective, settings)
    s = settings
    self.weights = {"silc": float(s["silc_weight"]), "tips": float(s["tips_weight"])}
    self.on = tuple(k for k in LOSSES if self.weights[k] > 0)
    if not self.on:
      return
    ctx, model = objective.ctx, objective.model
    if ctx.image_patches:
      raise base.ConfigError(
          "objective.silc_weight / tips_weight: SigLIP 2's self-distillation cuts crops and "
          "masks patches on an image grid, which NaFlex patch inputs (input.pp_image ending in "
          "naflex) do not have; use a fixed-size pp_image, or set both weights to 0.")
    self.modality = "image"
    if self.modality not in model.towers:
      raise base.ConfigError(f"objective.silc_weight / tips_weight need an image tower "
                             f"(model.towers.image); the towers are {sorted(model.towers)}.")
    self.scope = modalities_lib.get(self.modality).scope
    cls, kwargs = model.tower_kwargs(self.modality)
    if cls is not ViT:
      raise base.ConfigError("objective.silc_weight / tips_weight need a ViT image tower.")
    # The extra views run without patch dropout: masked positions and crops must stay whole.
    self.vit = ViT(**{**kwargs, "patch_dropout": 0.0})
    self.image_hw = tuple(base.image_shape(ctx)[:2])
    patch = self.vit.arch()["patch_size"]
    self.grid = (self.image_hw[0] // patch[0], self.image_hw[1] // patch[1])
    size = s["self_distill_local_crop_size"]
    if size is None:
      side = min(self.image_hw) * 3 // 7
      size = max(patch[0], side // patch[0] * patch[0])
    if size % patch[0] or size % patch[1] or size > min(self.image_hw):
      raise base.ConfigError(
          f"objective.self_distill_local_crop_size={size}: a local crop is a square of whole "
          f"patches ({patch[0]}x{patch[1]}) no larger than the image {self.image_hw}; "
          f"e.g. {patch[0] * max(1, min(self.image_hw) * 3 // 7 // patch[0])}.")
    self.crop_size = size
    total = ctx.total_steps
    # Not training (no run length): the losses are on from step 0.
    self.start = 0 if total is None else int(round(total * s["self_distill_start_fraction"]))

  @property
  def enabled(self) -> bool:
    return bool(self.on)

  # ----------------------------------------------------------------------- params and state

  def _head(self, name):
    s = self.settings
    return DinoHead(out_dim=s[f"{name}_head_dim"], hidden=s["self_distill_head_hidden"],
                    bottleneck=s["self_distill_head_bottleneck"])

  def init_params(self, rng, towers_params):
    img = nn.unbox(towers_params[self.scope])
    image = jnp.zeros((1,) + self.image_hw + (3,), jnp.float32)
    pooled, out = jax.eval_shape(lambda p: self.vit.apply({"params": p}, image), img)
    features = {"silc": pooled.shape[-1], "tips": out["pre_logits_2d"].shape[-1]}
    rngs = dict(zip(LOSSES, jax.random.split(rng, len(LOSSES))))
    sd = {f"{k}_head": self._head(k).init(rngs[k], jnp.zeros((1, features[k])))["params"]
          for k in self.on}
    if "tips" in self.on:  # iBOT's mask token starts at zero
      width = self.vit.arch()["width"]
      sd["mask_token"] = layers.logical(nn.initializers.zeros, (None, None, "embed"))(
          rng, (1, 1, width), jnp.float32)
    return {SCOPE: sd}

  def _student(self, params):
    """The teacher's tree, taken from the student's params."""
    return {self.scope: params[self.scope],
            SCOPE: {f"{k}_head": params[SCOPE][f"{k}_head"] for k in self.on}}

  def init_extra(self, params):
    s = self.settings
    return {"teacher": self._student(params),
            "center": {k: jnp.zeros((s[f"{k}_head_dim"],), jnp.float32) for k in self.on}}

  def update_extra(self, extra, params, step, stats=None):
    """The step's number `step` (1 for the first) <= start: the teacher is the student; after,
    the EMA. A step whose loss was on (step - 1 >= start) moves the centres towards its
    teacher's mean outputs (`stats`)."""
    decay = self.settings["self_distill_ema_decay"]
    follow = step <= self.start
    teacher = jax.tree.map(lambda t, p: jnp.where(follow, p, decay * t + (1 - decay) * p),
                           extra["teacher"], self._student(params))
    center = extra["center"]
    if stats is not None:
      m = self.settings["self_distill_center_momentum"]
      on = step - 1 >= self.start
      center = {k: jnp.where(on, m * c + (1 - m) * stats[k], c) for k, c in center.items()}
    return {"teacher": teacher, "center": center}

  # ----------------------------------------------------------------------- loss

  def loss(self, params, batch, rng, fwd, *, extra, step):
    del fwd  # SigLIP 2: the new losses see their own views, not the image-text pass's
    if step is None:
      raise ValueError("objective self_distill needs the step (the trainer passes it).")
    images = batch[modalities_lib.get(self.modality).batch_key]
    on = jnp.asarray(step) >= self.start
    compute = lambda: self._losses(params, images, rng, extra)
    zeros = lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(compute))
    loss, metrics = jax.lax.cond(on, compute, zeros)
    metrics["self_distill_on"] = on.astype(jnp.float32)
    return loss, metrics

  def _losses(self, params, images, rng, extra):
    """(weighted loss, metrics with the unweighted losses, the agreements and EXTRA_STATS)."""
    s = self.settings
    temps = s["self_distill_student_temp"], s["self_distill_teacher_temp"]
    teacher = jax.lax.stop_gradient(extra["teacher"])
    n = images.shape[0]
    t_pooled, t_out = self.vit.apply({"params": teacher[self.scope]}, images, train=False)
    k_crop, k_box, k_mask, k_drop = jax.random.split(rng, 4)
    loss, metrics, stats = 0.0, {}, {}
    if "silc" in self.on:
      head = lambda p, x: self._head("silc").apply({"params": p}, x)
      t_logits = head(teacher[SCOPE]["silc_head"], t_pooled)  # [B, K]
      crops_n = s["self_distill_local_crops"]
      boxes = local_boxes(k_box, n, crops_n, self.image_hw, s["self_distill_local_crop_scale"])
      crops = crop_and_resize(jnp.repeat(images, crops_n, axis=0),
                              boxes.reshape(n * crops_n, 4), self.crop_size)
      s_pooled, _ = self.vit.apply({"params": params[self.scope]}, crops, train=True,
                                   posemb_shape=self.grid, rngs={"dropout": k_crop})
      s_logits = head(params[SCOPE]["silc_head"], s_pooled).reshape(n, crops_n, -1)
      ce = dino_cross_entropy(s_logits, t_logits[:, None], extra["center"]["silc"], *temps)
      metrics["silc_loss"] = jnp.mean(ce)
      t_class = jnp.argmax(t_logits - extra["center"]["silc"], -1)  # the target's mode
      metrics["silc_agreement"] = jnp.mean(jnp.argmax(s_logits, -1) == t_class[:, None])
      stats["silc"] = jnp.mean(t_logits, axis=0)
      loss = loss + self.weights["silc"] * metrics["silc_loss"]
    if "tips" in self.on:
      head = lambda p, x: self._head("tips").apply({"params": p}, x)
      t_patches = t_out["pre_logits_2d"].reshape(n, -1, t_out["pre_logits_2d"].shape[-1])
      t_logits = head(teacher[SCOPE]["tips_head"], t_patches)  # [B, N, K]
      mask = random_patch_mask(k_mask, n, t_patches.shape[1], s["tips_mask_ratio"])
      img = {**params[self.scope], "mask_token": params[SCOPE]["mask_token"]}
      _, s_out = self.vit.apply({"params": img}, images, train=True, patch_mask=mask,
                                rngs={"dropout": k_drop})
      s_patches = s_out["pre_logits_2d"].reshape(t_patches.shape[:2] + (-1,))
      s_logits = head(params[SCOPE]["tips_head"], s_patches)
      ce = dino_cross_entropy(s_logits, t_logits, extra["center"]["tips"], *temps)
      weights = mask / jnp.sum(mask, axis=1, keepdims=True)
      metrics["tips_loss"] = jnp.mean(jnp.sum(ce * weights, axis=1))
      agree = jnp.argmax(s_logits, -1) == jnp.argmax(t_logits - extra["center"]["tips"], -1)
      metrics["tips_agreement"] = jnp.mean(jnp.sum(agree * weights, axis=1))
      stats["tips"] = jnp.mean(t_logits, axis=(0, 1))
      loss = loss + self.weights["tips"] * metrics["tips_loss"]
    metrics[base.EXTRA_STATS] = stats
    return jnp.asarray(loss, jnp.float32), metrics
