"""VideoMAE V2 objective: tube masking for the encoder, running-cell masking for the decoder
(dual masking), per-patch normalised pixel targets (Wang et al., "VideoMAE V2: Scaling Video
Masked Autoencoders with Dual Masking", CVPR 2023, section 3.3; the masks as in
OpenGVLab/VideoMAEv2@29eab1e dataset/masking_generator.py, the loss as in
engine_for_pretraining.py). Model: "videomae" (big_mm/models/videomae.py).

Per example, on the clip's token grid (t, h, w) (N = t*h*w tubelets):
- Tube masking (`mask_ratio`, VideoMAE's 0.9): floor(mask_ratio * h*w) spatial positions are
  masked in every time slice (one random spatial mask shared over time), the other
  K = t * (h*w - that) tokens are the encoder's.
- Running-cell masking (`decoder_mask_ratio`, V2's 0.5; 0 = V1, no decoder masking): the
  spatial grid is tiled by 2x2 cells; a cell's 4 positions, in row-major order c = 0..3, are
  masked for the decoder at time slice i iff (c + phase + i) mod 4 < 4 * decoder_mask_ratio,
  with one random phase in 0..3 per example: the masked positions run through the cell over
  time, and every position is kept in exactly (1 - decoder_mask_ratio) of any 4 consecutive
  slices. The decoder reconstructs the encoder-masked tokens that its mask keeps: with t a
  multiple of 4, exactly M = floor(mask_ratio * h*w) * t * (1 - decoder_mask_ratio) of them per
  example (all shapes static).
- Targets (`norm_pix_loss`, default True): each tubelet's pixels normalised per channel by their
  mean and (unbiased) std + 1e-6, as VideoMAE's; False: the raw pixels.
- loss = mean over the reconstructed tokens (and examples present) of the per-token MSE.

Batches: "video" f32 [B, T, H, W, 3] and optionally "video_present" int32 [B] (binding mode:
examples without a clip get no loss). Metrics: loss, and per example the encoder's visible
tokens, the masked tokens and the decoder's reconstructed tokens.
For evaluators: `embed(params, "video", x)` -> the encoder's output, every token visible,
mean-pooled [B, D] (x [B, T, H, W, 3], or [B, V, T, H, W, 3] test views: averaged over V).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from big_mm import modalities as modalities_lib
from big_mm.models import videomae as videomae_lib
from big_mm.objectives import base

CELL = 4  # positions in a running cell (2x2)


def tube_mask(rng, batch_size: int, grid, num_masked: int):
  """-> encoder_visible bool [B, N]: per example, the same random h*w - num_masked spatial
  positions of every time slice (grid = (t, h, w); N = t*h*w, row-major)."""
  t, h, w = grid
  noise = jax.random.uniform(rng, (batch_size, h * w))
  rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  spatial = rank >= num_masked
  return jnp.tile(spatial, (1, t))


def running_cell_keep(phase, grid, num_masked_per_cell: int):
  """-> decoder_keep bool [B, N]: running-cell masking (VideoMAE V2 section 3.3) with
  num_masked_per_cell of each 2x2 cell masked; phase int [B] in [0, 4). See the module
  docstring for the pattern."""
  t, h, w = grid
  i = jnp.arange(t)[:, None, None]
  c = 2 * (jnp.arange(h)[None, :, None] % 2) + jnp.arange(w)[None, None, :] % 2
  slot = (c[None] + i[None] + phase[:, None, None, None]) % CELL
  return (slot >= num_masked_per_cell).reshape(phase.shape[0], t * h * w)


def first_true(mask, count: int):
  """int32 [B, count]: the indices of the first `count` True entries of each row (ascending)."""
  return jnp.argsort(~mask, axis=1, stable=True)[:, :count].astype(jnp.int32)


def normalize_targets(tokens, channels: int = 3):
  """Per-token, per-channel normalisation of [B, N, P*C] pixels (VideoMAE's norm_pix_loss:
  mean, unbiased std + 1e-6)."""
  x = tokens.reshape(tokens.shape[:-1] + (-1, channels))
  mean = jnp.mean(x, axis=-2, keepdims=True)
  std = jnp.sqrt(jnp.var(x, axis=-2, keepdims=True, ddof=1))
  return ((x - mean) / (std + 1e-6)).reshape(tokens.shape)


class VideoMAE:
  """Objective "videomae" over model "videomae". Reads the context's video shape
  (input.pp_modalities["video"])."""
  NAME = "videomae"
  SETTINGS = dict(mask_ratio=0.9, decoder_mask_ratio=0.5, norm_pix_loss=True)
  BATCH_KEYS = ("video", modalities_lib.present_key("video"))

  @classmethod
  def check_settings(cls, settings) -> None:
    r = base.number("mask_ratio", settings["mask_ratio"])
    if not 0 < r < 1:
      raise base.ConfigError(f"objective.mask_ratio must be in (0, 1) (VideoMAE's tube masking "
                             f"uses 0.9), got {r!r}.")
    d = base.number("decoder_mask_ratio", settings["decoder_mask_ratio"])
    if d not in (0, 0.25, 0.5, 0.75):
      raise base.ConfigError(
          f"objective.decoder_mask_ratio={d!r}: running-cell masking masks whole positions of "
          "each 2x2 cell, so use 0.25, 0.5 (VideoMAE V2) or 0.75, or 0 for no decoder masking.")
    if not isinstance(settings["norm_pix_loss"], bool):
      raise base.ConfigError(
          f"objective.norm_pix_loss must be True or False, got {settings['norm_pix_loss']!r}.")

  def __init__(self, model, ctx: base.Context, **settings):
    settings = base.fill(type(self), settings)
    if not isinstance(model, videomae_lib.VideoMAE):
      raise base.ConfigError(
          f"objective.name='videomae' needs model_name='videomae', not a {type(model).__name__}.")
    self.model, self.mesh, self.ctx = model, ctx.mesh, ctx
    self.norm_pix = settings["norm_pix_loss"]
    self.example = base.modality_example(ctx, ("video",))
    shape = self.example["video"].shape[1:]
    if len(shape) != 4 or shape[-1] != 3:
      raise base.ConfigError(
          f"objective.name='videomae' trains on single clips [T, H, W, 3], but "
          f"input.pp_modalities['video'] makes {shape}; sample one clip (no test views).")
    try:
      self.grid = model.grid(shape)
    except ValueError as e:
      raise base.ConfigError(str(e)) from None
    t, h, w = self.grid
    self.num_masked = math.floor(settings["mask_ratio"] * h * w + 1e-9)
    if not 0 < self.num_masked < h * w:
      raise base.ConfigError(
          f"objective.mask_ratio={settings['mask_ratio']} masks {self.num_masked} of the "
          f"{h * w} spatial positions ({h}x{w}); it must mask at least one and keep at least "
          "one: change mask_ratio or the clip size.")
    self.cell_masked = round(CELL * settings["decoder_mask_ratio"])
    if self.cell_masked and (t % CELL or h % 2 or w % 2):
      raise base.ConfigError(
          f"objective.decoder_mask_ratio={settings['decoder_mask_ratio']} (running-cell "
          f"masking) needs an even spatial token grid and time slices in multiples of {CELL} "
          f"(the cell's period, so every example reconstructs as many tokens); the clip's grid "
          f"is t={t}, h={h}, w={w}: change the frames / crop size, or set decoder_mask_ratio=0.")
    self.num_visible = t * (h * w - self.num_masked)
    self.num_targets = t * self.num_masked * (CELL - self.cell_masked) // CELL

  # ---- pieces ----------------------------------------------------------------------------

  def masks(self, rng, batch_size: int):
    """-> (visible int32 [B, K], targets int32 [B, M]): the encoder's tokens and those the
    decoder reconstructs (both ascending)."""
    tube_rng, cell_rng = jax.random.split(rng)
    enc_visible = tube_mask(tube_rng, batch_size, self.grid, self.num_masked)
    wanted = ~enc_visible
    if self.cell_masked:
      phase = jax.random.randint(cell_rng, (batch_size,), 0, CELL)
      wanted = wanted & running_cell_keep(phase, self.grid, self.cell_masked)
    return first_true(enc_visible, self.num_visible), first_true(wanted, self.num_targets)

  def targets(self, video):
    """[B, N, tubelet*p*p*3] pixel targets (normalised per tubelet with norm_pix_loss)."""
    tokens = videomae_lib.patchify(video.astype(jnp.float32), self.model.patch_sizes())
    return normalize_targets(tokens) if self.norm_pix else tokens

  # ---- training --------------------------------------------------------------------------

  def loss_fn(self, params, batch, rng):
    mask_rng, dropout_rng = jax.random.split(rng)
    video = batch["video"]
    b = video.shape[0]
    visible, targets = self.masks(mask_rng, b)
    preds, _ = self.model.apply({"params": params}, video, visible, targets, train=True,
                                rngs={"dropout": dropout_rng})
    wanted = jnp.take_along_axis(self.targets(video), targets[..., None], axis=1)
    err = jnp.mean((preds - wanted) ** 2, axis=-1)
    present = batch.get(modalities_lib.present_key("video"))
    weight = jnp.ones((b,)) if present is None else (jnp.asarray(present) > 0).astype(jnp.float32)
    loss = jnp.sum(err * weight[:, None]) / jnp.maximum(jnp.sum(weight) * self.num_targets, 1.0)
    metrics = {"videomae/visible_tokens": jnp.float32(self.num_visible),
               "videomae/masked_tokens": jnp.float32(self.grid[0] * self.num_masked),
               "videomae/reconstructed_tokens": jnp.float32(self.num_targets),
               "videomae/examples": jnp.sum(weight)}
    return loss, metrics

  def example_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    return dict(self.example)

  def init_params(self, rng):
    """Initial (boxed) params from zeros shaped like `example_batch()`."""
    video = base.zeros(self.example_batch())["video"]
    return self.model.init({"params": rng}, video, jnp.zeros((1, self.num_visible), jnp.int32),
                           jnp.zeros((1, self.num_targets), jnp.int32))["params"]

  # ---- evaluation ------------------------------------------------------------------------

  def embed(self, params, modality: str, x):
    """Mean-pooled encoder features [B, D] of clips x [B, T, H, W, 3] (every token visible), or
    of test views [B, V, T, H, W, 3] (averaged over V)."""
    if modalities_lib.get(modality).name != "video":
      raise ValueError(f"objective 'videomae' embeds video only, not {modality!r}.")
    views = x.shape[1] if x.ndim == 6 else 1
    clips = x.reshape((-1,) + x.shape[-4:])
    encoded = self.model.apply({"params": params}, clips, method="encode")
    pooled = jnp.mean(encoded.astype(jnp.float32), axis=1)
    return jnp.mean(pooled.reshape((x.shape[0], views, -1)), axis=1)
