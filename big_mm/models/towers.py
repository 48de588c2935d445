"""Towers model (CLIP, SigLIP, LiT, N-modal binding): a dict of named towers, one per modality,
and the contrastive head scalars. big_vision `proj/image_text/two_towers.py` param layout.

  model = Towers(towers={"image": {"tower": "vit", "variant": "B/16"},
                         "text": {"vocab_size": 32_000}}, out_dim=512)
  z, out = model.apply({"params": p}, {"image": images, "text": tokens}, train=False)

towers: modality name (big_mm/modalities.py) -> that tower's kwargs; "tower" picks the tower
class from TOWERS (default: the modality's `tower`), every other key goes to its constructor
(invalid keys raise TypeError). Param tree: one subtree per tower under the modality's param
scope (`img/...` ViT, `txt/...` TextTransformer; others their modality name), `t` [1] (log
temperature), `b` [1] (bias; zeros when bias_init is None).

An input is an array, or {"x": array, "mask": ..., "shape": ...} for a padded
variable-length one (`modalities.model_input`; the tower gets mask= / shape=, e.g. NaFlex).
z[m]: the L2-normalised float32 [B, D_m] embedding of every modality given (inputs that are
absent or None are skipped). out["t"] = exp(t), out["t/parameterized"] = t, out["b"] (scalars),
plus each tower's out dict under "<scope>/<key>".
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from big_mm import modalities
from big_mm.models import layers
from big_mm.models.audio import AudioTransformer
from big_mm.models.mlp import MlpTower
from big_mm.models.points import PointTransformer
from big_mm.models.text import TextTransformer
from big_mm.models.video import FrameViT, VideoViT
from big_mm.models.vit import ViT, check_kwargs

# Tower name -> module class: `cls(num_classes=D, **kwargs)(x, train=) -> (pooled [B, D], out)`.
TOWERS = {
    "vit": ViT,
    "text_transformer": TextTransformer,
    "mlp": MlpTower,
    "audio_transformer": AudioTransformer,
    "point_transformer": PointTransformer,
    "video_vit": VideoViT,
    "frame_vit": FrameViT,
}


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x * jnp.reciprocal(jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps)))


def tower_spec(modality: str, kwargs: Optional[Mapping]) -> tuple[type, dict]:
  """(tower class, its kwargs) for one `towers` entry; errors name the config key."""
  kwargs = dict(kwargs or {})
  try:
    mod = modalities.get(modality)
  except ValueError as e:
    raise ValueError(f"model.towers: {e}") from None
  name = kwargs.pop("tower", mod.tower)
  if name not in TOWERS:
    raise ValueError(f"model.towers.{modality}.tower={name!r} is not a tower; choose one of "
                     f"{sorted(TOWERS)} (big_mm/models/towers.py TOWERS).")
  check_kwargs(TOWERS[name], kwargs, f"model.towers.{modality}")
  return TOWERS[name], kwargs


class Towers(nn.Module):
  """towers: {modality: kwargs} (see the module docstring).

  out_dim: int (every tower) or {modality: int}; sets each tower's `head` Dense (`num_classes`);
  0/None for a tower means no head (its pooled features are used). A head is initialised
  non-zero unless the tower's kwargs say otherwise (a zero head would make the normalised
  embedding undefined at init).
  """
  towers: Optional[Mapping[str, Any]] = None
  out_dim: Union[int, Mapping[str, Optional[int]], None] = 128
  temperature_init: float = 1.0
  bias_init: Optional[float] = None

  def __post_init__(self):
    if not self.towers:
      raise ValueError("model.towers is empty; give one entry per modality, e.g. "
                       "towers={'image': {'variant': 'B/16'}, 'text': {'vocab_size': 32000}}.")
    for m, kwargs in self.towers.items():
      tower_spec(m, kwargs)
    self.out_dims()
    if self.temperature_init is not None and not self.temperature_init > 0:
      raise ValueError(f"temperature_init must be > 0; got {self.temperature_init}.")
    super().__post_init__()

  def out_dims(self) -> dict[str, Optional[int]]:
    return out_dims(self.out_dim, self.towers)

  def tower_kwargs(self, modality: str) -> tuple[type, dict]:
    """(class, full kwargs) of one tower, head size and head init included."""
    cls, kwargs = tower_spec(modality, self.towers[modality])
    defaults = {"num_classes": self.out_dims()[modality]}
    if "head_zeroinit" in cls.__dataclass_fields__:
      defaults["head_zeroinit"] = False
    return cls, {**defaults, **kwargs}

  @nn.compact
  def __call__(self, inputs: Mapping[str, Any], *, train: bool = False):
    out, z = {}, {}
    unknown = set(inputs) - set(self.towers)
    if unknown:
      raise ValueError(f"Inputs {sorted(unknown)} have no tower; the towers are "
                       f"{sorted(self.towers)}.")
    for m in self.towers:
      if inputs.get(m) is None:
        continue
      cls, kwargs = self.tower_kwargs(m)
      scope = modalities.get(m).scope
      x, extra = inputs[m], {}
      if isinstance(x, Mapping):
        x, extra = x["x"], {k: v for k, v in x.items() if k != "x"}
      pooled, tower_out = cls(**kwargs, name=scope)(x, train=train, **extra)
      out.update({f"{scope}/{k}": v for k, v in tower_out.items()})
      z[m] = l2_normalize(pooled)

    out.update(contrastive_scalars(self, self.temperature_init, self.bias_init))
    return z, out


def contrastive_scalars(module: nn.Module, temperature_init: float,
                        bias_init: Optional[float]) -> dict:
  """The params `t` [1] (log temperature, init log temperature_init) and `b` [1] (bias, init
  bias_init or 0) of `module` -> {"t/parameterized": t, "t": exp(t), "b": b} (scalars)."""
  t_init = float(np.log(temperature_init))
  t = module.param("t", layers.logical(lambda k, s, d: jnp.full(s, t_init, d), (None,)),
                   (1,), jnp.float32)
  b_init = 0.0 if bias_init is None else float(bias_init)
  b = module.param("b", layers.logical(lambda k, s, d: jnp.full(s, b_init, d), (None,)),
                   (1,), jnp.float32)
  return {"t/parameterized": t[0], "t": jnp.exp(t[0]), "b": b[0]}


def out_dims(out_dim, modalities_: Mapping[str, Any]) -> dict[str, Optional[int]]:
  """`out_dim` (an int for every tower, or {modality: int}) -> {modality: int or None}."""
  if out_dim is None or isinstance(out_dim, (int, np.integer)):
    return {m: out_dim for m in modalities_}
  if not isinstance(out_dim, Mapping) or set(out_dim) - set(modalities_):
    raise ValueError(f"model.out_dim must be an int or {{modality: int}} over the towers "
                     f"{sorted(modalities_)}; got {out_dim!r}.")
  return {m: out_dim.get(m) for m in modalities_}


def from_two_towers(kwargs: Mapping[str, Any]) -> dict:
  """Kwargs of the former two_towers model (image= / text= tower kwargs, out_dim=(image,
  text)) -> Towers kwargs (towers={"image": ..., "text": ...}, out_dim per modality)."""
  kwargs = dict(kwargs)
  kwargs["towers"] = {m: dict(kwargs.pop(m, None) or {}) for m in ("image", "text")}
  out_dim = kwargs.get("out_dim")
  if isinstance(out_dim, (tuple, list)):
    kwargs["out_dim"] = dict(zip(("image", "text"), out_dim))
  return kwargs
