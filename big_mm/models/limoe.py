"""LIMoE: one mixture-of-experts transformer shared by the image and the text (Mustafa et al.
2022, "Multimodal Contrastive Learning with LIMoE: the Language-Image Mixture of Experts",
arXiv:2206.02770): image patches and text tokens go through the same weights, each modality
its own sequence; only the stems, pooling and heads are per modality.

  model = LIMoE(towers={"image": {"patch_size": (16, 16), "pool": "map"},
                        "text": {"vocab_size": 32_000}},
                variant="B", moe=dict(layers="every_2", num_experts=8,
                                      entropy_local_weight=0.01, entropy_global_weight=0.01,
                                      entropy_global_threshold=1.0),
                out_dim=512)
  z, out = model.apply({"params": p}, {"image": images, "text": tokens}, train=False)

towers: {modality: kwargs} for "image" (patch_size, default the variant's or (16, 16);
posemb "learn" | "sincos2d"; pool "gap" | "map") and "text" (vocab_size, default 32,000;
pool "last": the last non-pad token, as TextTransformer). The transformer's size comes from
`variant` / width / depth / mlp_dim / num_heads as for ViT; `moe` is a tower's `moe=` dict
(big_mm/models/moe.py), with LIMoE's per-modality entropy terms (entropy_local_weight,
entropy_global_weight, entropy_global_threshold): each modality's calls tag them with its
name, so they are sown as `entropy_local/image`, `entropy_global/text`, ... and logged as
`aux_loss/entropy_local/image`, ...; the MoE statistics come per modality too
(`img/moe_dropped`, `txt/moe_load/expert_0`, ...).

Params: `shared/Transformer/...` (the one encoder, encoder_norm included), per modality under
its scope: `img/{embedding, pos_embedding, modality_embedding, MAPHead_0 (pool="map"), head}`,
`txt/{Embed_0, pos_embedding, modality_embedding, head}`, and `t`, `b` as in Towers.
Outputs as Towers: z[m] the L2-normalised embedding of every modality given (absent or None
skipped), out["t"], out["t/parameterized"], out["b"], and "<scope>/<key>" (img: stem,
encoded, pre_logits, logits; txt: embedded, encoded, pre_logits, logits).

Sharing: the encoder's params are one param (`shared/Transformer`, created by the encoder's
own init) that each modality's tower applies with `Encoder.apply`, its MoE layers tagged with
that modality; the sown aux terms and statistics are re-sown under the tower's scope, so
the objective collects them as from any tower. Gradients of both uses add up.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from big_mm import modalities
from big_mm.models import layers, moe, text
from big_mm.models import towers as towers_lib
from big_mm.models.vit import resolve_arch, scale_pixels

# Per-modality kwargs and their defaults (None: from the variant / (16, 16) / 32,000).
TOWER_KWARGS = {"image": dict(patch_size=None, posemb="learn", pool="gap",
                              pixel_range=(-1.0, 1.0)),  # uint8 input -> this range (ViT's)
                "text": dict(vocab_size=32_000, pool="last")}
POOLS = {"image": ("gap", "map"), "text": ("last",)}
AUX_COLLECTIONS = (layers.AUX_LOSS, layers.AUX_METRIC)


def _modality_embedding(module: nn.Module, width: int):
  return module.param("modality_embedding", layers.logical(
      nn.initializers.normal(stddev=1 / np.sqrt(width)), (None, None, "embed")),
                      (1, 1, width), jnp.float32)


class _Tower(nn.Module):
  """One modality's stem, its use of the shared encoder, pooling and head (under its scope)."""
  modality: str
  kwargs: Mapping[str, Any]
  arch: Mapping[str, Any]
  encoder: layers.Encoder      # unbound; applied with the shared params
  num_classes: Optional[int]
  dropout: float
  dtype: Any

  def _encode(self, shared, x, train):
    """The shared encoder on x; its sown aux terms re-sown here (this tower's scope)."""
    mutable = [c for c in AUX_COLLECTIONS if self.is_mutable_collection(c)]
    rngs = {"dropout": self.make_rng("dropout")} if train and self.has_rng("dropout") else {}
    (x, _), state = self.encoder.apply({"params": shared}, x, None, deterministic=not train,
                                       rngs=rngs, mutable=mutable)
    for collection, sown in state.items():
      self.sow(collection, "Transformer", sown)
    return x

  @nn.compact
  def __call__(self, x, shared, *, train: bool = False):
    a, kw, out = self.arch, self.kwargs, {}
    dtype = layers.to_dtype(self.dtype)
    width = a["width"]
    if self.modality == "image":
      x = out["stem"] = nn.Conv(
          width, kw["patch_size"], strides=kw["patch_size"], padding="VALID", dtype=dtype,
          param_dtype=jnp.float32, name="embedding",
          kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
          bias_init=layers.logical(nn.initializers.zeros, ("embed",)))(
              scale_pixels(x, kw["pixel_range"], dtype))
      n, h, w, _ = x.shape
      x = x.reshape(n, h * w, width)
      x = x + layers.get_posemb(self, kw["posemb"], (h, w), width, "pos_embedding", dtype)
    else:
      if x.ndim != 2:
        raise ValueError(f"text must be int tokens [batch, length]; got shape {x.shape}.")
      tokens = x
      x = out["embedded"] = nn.Embed(
          kw["vocab_size"], width, dtype=dtype, param_dtype=jnp.float32,
          embedding_init=layers.logical(nn.linear.default_embed_init, ("vocab", "embed")))(x)
      x = x + layers.learned_posemb(self, "pos_embedding", x.shape[1], width).astype(dtype)
    x = x + _modality_embedding(self, width).astype(dtype)
    x = nn.Dropout(rate=self.dropout)(layers.constrain(x), not train)
    x = out["encoded"] = self._encode(shared, x, train)

    if self.modality == "text":
      x = jnp.take_along_axis(x, text.last_token_index(tokens)[:, None, None], axis=1)[:, 0]
    elif kw["pool"] == "map":
      x = layers.MAPHead(num_heads=a["num_heads"], mlp_dim=a["mlp_dim"],
                         attn_implementation=self.encoder.block.attn_implementation,
                         dtype=self.dtype)(x)
    else:
      x = jnp.mean(x, axis=1)
    x = out["pre_logits"] = x
    if self.num_classes:
      x = out["logits"] = layers.head(self.num_classes, dtype=dtype)(x)
    return x, out


class LIMoE(nn.Module):
  """Image and text through one (mixture-of-experts) transformer (see the module docstring).

  out_dim: int (both) or {modality: int}: each modality's head size; 0/None: no head.
  """
  towers: Optional[Mapping[str, Any]] = None
  variant: Optional[str] = None
  width: Optional[int] = None        # default (no variant): B
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None      # default 4 * width
  num_heads: Optional[int] = None
  moe: Optional[Mapping[str, Any]] = None
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "none"
  attn_implementation: str = "xla"
  dtype: Any = "float32"
  out_dim: Union[int, Mapping[str, Optional[int]], None] = 128
  temperature_init: float = 1.0
  bias_init: Optional[float] = None

  def __post_init__(self):
    self.tower_kwargs()
    self.out_dims()
    self.moe_settings()
    if not self.temperature_init > 0:
      raise ValueError(f"temperature_init must be > 0; got {self.temperature_init}.")
    super().__post_init__()

  def arch(self) -> dict:
    return resolve_arch(self, dict(width=768, depth=12, mlp_dim=None, num_heads=12))

  def tower_kwargs(self) -> dict[str, dict]:
    """{modality name: its kwargs with defaults}; errors name the config key."""
    if not self.towers:
      raise ValueError("model.towers is empty; LIMoE needs towers={'image': {...}, "
                       "'text': {'vocab_size': ...}}.")
    out = {}
    for m, kwargs in self.towers.items():
      name = modalities.get(m).name
      if name not in TOWER_KWARGS:
        raise ValueError(f"model.towers.{m}: LIMoE has stems for {sorted(TOWER_KWARGS)} only.")
      kwargs = dict(kwargs or {})
      unknown = set(kwargs) - set(TOWER_KWARGS[name])
      if unknown:
        raise ValueError(f"model.towers.{m}: unknown keys {sorted(unknown)}; valid: "
                         f"{sorted(TOWER_KWARGS[name])}.")
      kwargs = {**TOWER_KWARGS[name], **kwargs}
      if kwargs["pool"] not in POOLS[name]:
        raise ValueError(f"model.towers.{m}.pool={kwargs['pool']!r}; valid: {POOLS[name]}.")
      if name == "image":
        p = kwargs["patch_size"] or self.arch().get("patch_size", (16, 16))
        kwargs["patch_size"] = (int(p), int(p)) if isinstance(p, int) else tuple(map(int, p))
      out[name] = kwargs
    return out

  def out_dims(self) -> dict[str, Optional[int]]:
    return towers_lib.out_dims(self.out_dim, self.towers)

  def moe_settings(self):
    return moe.settings(self.moe, self.arch()["depth"], where="model.moe")

  def encoder(self, tag: Optional[str]) -> layers.Encoder:
    """The shared encoder (unbound); its MoE layers tag their entropy terms with `tag`."""
    a = self.arch()
    block = layers.BlockConfig(num_heads=a["num_heads"], mlp_dim=a["mlp_dim"],
                               dropout=self.dropout,
                               attn_implementation=self.attn_implementation, dtype=self.dtype)
    s, idx = self.moe_settings()
    extra = {} if s is None else {"moe_block": moe.block_config(
        block, dataclasses.replace(s, tag=tag)), "moe_layers": idx}
    return layers.Encoder(depth=a["depth"], block=block, scan=self.scan,
                          remat_policy=self.remat_policy, parent=None, **extra)

  def _init_encoder(self, rng):
    s, _ = self.moe_settings()
    x = jnp.zeros((1 if s is None else s.group_examples, 1, self.arch()["width"]),
                  layers.to_dtype(self.dtype))
    return self.encoder(None).init({"params": rng}, x, None, deterministic=True)["params"]

  @nn.compact
  def __call__(self, inputs: Mapping[str, Any], *, train: bool = False):
    out, z = {}, {}
    unknown = set(inputs) - set(self.towers)
    if unknown:
      raise ValueError(f"Inputs {sorted(unknown)} have no tower; the towers are "
                       f"{sorted(self.towers)}.")
    kwargs, dims, shared = self.tower_kwargs(), self.out_dims(), None
    for m in self.towers:
      x = inputs.get(m)
      if x is None:
        continue
      if isinstance(x, Mapping):
        raise ValueError(f"LIMoE takes {m} as one array; padded variable-length inputs "
                         "(NaFlex) are for the towers model.")
      if shared is None:
        shared = _ParamTree(self._init_encoder, name="shared")()
      mod = modalities.get(m)
      pooled, tower_out = _Tower(mod.name, kwargs[mod.name], self.arch(), self.encoder(mod.name),
                                 dims[m], self.dropout, self.dtype, name=mod.scope)(
                                     x, shared, train=train)
      out.update({f"{mod.scope}/{k}": v for k, v in tower_out.items()})
      z[m] = towers_lib.l2_normalize(pooled)

    out.update(towers_lib.contrastive_scalars(self, self.temperature_init, self.bias_init))
    return z, out


class _ParamTree(nn.Module):
  """A param subtree `Transformer` made by `init_fn(rng)` (a module's init): the shared
  encoder's params, which its users apply themselves (and so check their shapes)."""
  init_fn: Any

  @nn.compact
  def __call__(self):
    if self.has_variable("params", "Transformer"):  # not self.param: it would trace init_fn
      return nn.unbox(self.get_variable("params", "Transformer"))
    return self.param("Transformer", self.init_fn)
