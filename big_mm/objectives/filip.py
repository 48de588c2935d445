"""FILIP objective (Yao et al. 2021): image-text contrastive learning on the token-wise late
interaction similarity instead of the global embeddings' dot product.

The towers model is the contrastive one (`model_name="towers"`, an image and a text tower).
Token features, projected into the joint space by each tower's own head (the paper projects
tokens with the global feature's projection) and L2-normalised:
  image: the ViT's patch tokens through its head (`img/logits_2d`; without a head, the patch
         tokens as they are, `img/pre_logits_2d`), class token excluded;
  text:  the text transformer's output tokens (`txt/transformed`) through its head; padding
         tokens (id 0) are excluded.
The loss is big_mm/objectives/filip_loss.py's over the global batch (`loss` softmax as in the
paper or sigmoid; `strategy` all_gather | ring | local; `implementation` xla | pallas).
`image_token_keep` < 1 keeps a random subset of that fraction of the patches per image in the
loss (the paper's token reduction; here it shrinks the loss's work and memory, the image tower
still runs on every patch).

Predict fns for the evaluators: `embed_images` / `embed_texts` give the flattened token
features ([B, L * d], padding zero) and `similarity(zimg, ztxt, direction)` the [Ni, Nt]
scores (img2txt: the image->text similarity, mean over patches of the max over tokens;
txt2img: text->image, mean over tokens of the max over patches); the zeroshot and retrieval
evaluators use it and say so in their logs.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_mm import sharding
from big_mm.kernels import filip as filip_kernels
from big_mm.models import aux_loss
from big_mm.models.towers import l2_normalize
from big_mm.objectives import base, filip_loss
from big_mm.objectives.contrastive import Contrastive, check_loss_settings

_SCORE_TOKENS = 4096  # evaluator scores: image / text tokens per scored block


class Filip(Contrastive):
  """The FILIP loss between the image and text towers of a towers model; see the module
  docstring. Shares the contrastive objective's example batch, params and frozen-param
  handling."""
  NAME = "filip"
  SETTINGS = dict(loss="softmax", strategy="all_gather", implementation="xla",
                  image_token_keep=1.0)
  HINTS = {"image_token_keep": "image token dropping is a setting of the filip objective"}
  MODALITIES = ("image", "text")

  @classmethod
  def check_settings(cls, settings) -> None:
    check_loss_settings(settings)
    keep = base.number("image_token_keep", settings["image_token_keep"])
    if not 0 < keep <= 1:
      raise base.ConfigError(f"objective.image_token_keep is the fraction of image patches "
                             f"kept in the loss, in (0, 1] (1: all); got {keep!r}.")

  def __init__(self, model, ctx: base.Context, **settings):  # pylint: disable=super-init-not-called
    settings = base.fill(type(self), settings)
    self.model, self.ctx, self.mesh = model, ctx, ctx.mesh
    self.loss_name, self.strategy = settings["loss"], settings["strategy"]
    self.implementation = settings["implementation"]
    self.image_token_keep = float(settings["image_token_keep"])
    self.micro_batches, self.modalities = 1, self.MODALITIES
    towers = dict(getattr(model, "towers", None) or {})
    if set(self.MODALITIES) - set(towers):
      raise base.ConfigError(
          f"objective.name='filip' contrasts image and text tokens, but model.towers has "
          f"{sorted(towers)}; use model_name='towers' with an image and a text tower.")
    self.keys, self.scopes = self.MODALITIES, ("img", "txt")
    base.check_vocab(ctx, dict(towers["text"] or {}).get("vocab_size"),
                     "model.towers.text.vocab_size")
    if ctx.batch_size is not None:
      self._check_batch_size(ctx.batch_size)
    self.tokens, self.dim = self._token_shapes()

  def _token_shapes(self):
    """((image tokens, text tokens), d) from shapes alone; the two dims must agree."""
    example = base.zeros(base.modality_example(self.ctx, self.MODALITIES))
    params = jax.eval_shape(lambda: nn.unbox(self.model.init(jax.random.key(0), example,
                                                             train=False)["params"]))
    features = jax.eval_shape(lambda p: self._token_features(p, example, train=False), params)
    xi, xt = features["image"][0], features["text"][0]
    if xi.shape[-1] != xt.shape[-1]:
      raise base.ConfigError(
          f"FILIP compares image patches with text tokens, but they have {xi.shape[-1]} and "
          f"{xt.shape[-1]} features; give both towers a head of one size (model.out_dim=D) "
          f"or the same width.")
    keep = max(1, round(self.image_token_keep * xi.shape[1]))
    return (keep, xt.shape[1]), xi.shape[-1]

  # ----------------------------------------------------------------------- token features

  def _token_features(self, params, inputs, *, train, rng=None):
    """{"image": (tokens [B, Li, d], None), "text": (tokens [B, Lt, d], real [B, Lt])},
    normalised, for the inputs given (image and/or text); with train, also the towers' aux
    loss terms."""
    if train:
      (_, out), aux = aux_loss.apply(self.model, params, inputs, train=True,
                                     rngs={"dropout": rng})
    else:
      (_, out), aux = self.model.apply({"params": params}, inputs, train=False), {}
    features = {}
    if inputs.get("image") is not None:
      image = out.get("img/logits_2d", out.get("img/pre_logits_2d"))
      features["image"] = (l2_normalize(image.reshape(image.shape[0], -1, image.shape[-1])),
                           None)
    if inputs.get("text") is not None:
      text = out["txt/transformed"].astype(jnp.float32)
      head = params["txt"].get("head")
      if head is not None:  # the text tower's own projection, applied to every token
        text = text @ head["kernel"].astype(jnp.float32)
        if "bias" in head:
          text = text + head["bias"].astype(jnp.float32)
      features["text"] = (l2_normalize(text), inputs["text"] != 0)
    return (features, aux) if train else features

  def _drop_image_tokens(self, image, rng):
    """A random subset of image_token_keep of each image's patches (the paper's token
    reduction), drawn per image."""
    keep = self.tokens[0]
    if keep == image.shape[1]:
      return image
    order = jnp.argsort(jax.random.uniform(rng, image.shape[:2]), axis=1)[:, :keep]
    return jnp.take_along_axis(image, order[..., None], axis=1)

  # ----------------------------------------------------------------------- loss

  def loss_fn(self, params, batch, rng):
    params = base.stop_frozen(self.ctx, params)
    rng_dropout, rng_tokens = jax.random.split(rng)
    features, aux = self._token_features(
        params, {"image": batch["image"], "text": batch["text"]}, train=True, rng=rng_dropout)
    (image, _), (text, real) = features["image"], features["text"]
    image = self._drop_image_tokens(image, rng_tokens)
    _, out = self.model.apply({"params": params}, {}, train=True)
    ximg, xtxt = filip_kernels.flatten_tokens(image), filip_kernels.flatten_tokens(text, real)
    loss = filip_loss.filip_loss(
        ximg, xtxt, out["t"], out["b"], tokens=self.tokens, dim=self.dim, loss=self.loss_name,
        strategy=self.strategy, mesh=self.mesh,
        batch_axes=sharding.batch_axes(self.mesh) if self.mesh is not None else (),
        implementation=self.implementation)
    metrics = {"t": out["t"], "t/parameterized": out["t/parameterized"], "b": out["b"],
               "text_tokens": jnp.mean(jnp.sum(real, axis=1).astype(jnp.float32))}
    return aux_loss.add(loss, metrics, aux)

  def value_and_grad(self, params, batch, rng):
    return jax.value_and_grad(self.loss_fn, has_aux=True)(params, batch, rng)

  # ----------------------------------------------------------------------- predict fns

  def embed_images(self, params, images):
    """[B, Li * d]: every patch's normalised token feature, flattened."""
    image, _ = self._token_features(params, {"image": images}, train=False)["image"]
    return filip_kernels.flatten_tokens(image)

  def embed_texts(self, params, texts):
    """[B, Lt * d]: every token's normalised feature, flattened, padding tokens zero."""
    return filip_kernels.flatten_tokens(
        *self._token_features(params, {"text": texts}, train=False)["text"])

  def similarity(self, zimg: np.ndarray, ztxt: np.ndarray, direction: str = "img2txt"):
    """[Ni, Nt] host scores of flattened image / text tokens (embed_images / embed_texts):
    img2txt the image->text similarity, txt2img the text->image one (module docstring).
    Computed in blocks of about _SCORE_TOKENS x _SCORE_TOKENS token pairs."""
    n_img, n_txt = zimg.shape[1] // self.dim, ztxt.shape[1] // self.dim
    fn = _block_similarity(n_img, n_txt, self.dim, {"img2txt": "a", "txt2img": "b"}[direction])
    rows, cols = max(1, _SCORE_TOKENS // n_img), max(1, _SCORE_TOKENS // n_txt)
    out = np.zeros((len(zimg), len(ztxt)), np.float32)
    for i in range(0, len(zimg), rows):
      for j in range(0, len(ztxt), cols):
        out[i:i + rows, j:j + cols] = fn(zimg[i:i + rows], ztxt[j:j + cols])
    return out


@functools.lru_cache(maxsize=None)
def _block_similarity(n_img, n_txt, dim, reduce):
  sim = filip_kernels.TokenwiseMax(n_img, n_txt, dim, reduce)
  return jax.jit(lambda a, b: sim(a, b))
