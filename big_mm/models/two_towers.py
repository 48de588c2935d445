"""Two-tower image/text model (CLIP, SigLIP, LiT), big_vision `proj/image_text/two_towers.py` layout.

Param tree: `img/...` (ViT), `txt/...` (TextTransformer), `t` [1] (log temperature),
`b` [1] (bias; zeros when bias_init is None).

  zimg, ztxt, out = model.apply({"params": p}, image, text, train=False)

zimg / ztxt: L2-normalised float32 [B, out_dim] (None when that input is None).
out["t"] = exp(t) (scalar), out["t/parameterized"] = t (scalar), out["b"] (scalar),
plus each tower's out dict under "img/<key>" / "txt/<key>".
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from big_mm.models import layers
from big_mm.models.text import TextTransformer
from big_mm.models.vit import ViT, check_kwargs


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x * jnp.reciprocal(jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps)))


class TwoTowers(nn.Module):
  """image / text: keyword dicts for ViT / TextTransformer (invalid keys raise TypeError).

  out_dim: int (both towers) or (img_dim, txt_dim); sets each tower's `head` Dense
  (`num_classes`); 0/None for a tower means no head (its pooled features are used).
  The image head is initialised non-zero unless image["head_zeroinit"] is given
  (a zero head would make the normalised embedding undefined at init).
  """
  image: Optional[Any] = None
  text: Optional[Any] = None
  out_dim: Union[int, Sequence[int], None] = 128
  temperature_init: float = 1.0
  bias_init: Optional[float] = None

  def __post_init__(self):
    check_kwargs(ViT, dict(self.image or {}), "model.image")
    check_kwargs(TextTransformer, dict(self.text or {}), "model.text")
    if self.temperature_init is not None and not self.temperature_init > 0:
      raise ValueError(f"temperature_init must be > 0; got {self.temperature_init}.")
    super().__post_init__()

  def _out_dims(self):
    d = self.out_dim
    if d is None or isinstance(d, (int, np.integer)):
      return d, d
    d = tuple(d)
    if len(d) != 2:
      raise ValueError(f"out_dim must be an int or (img_dim, txt_dim); got {self.out_dim!r}.")
    return d

  @nn.compact
  def __call__(self, image, text=None, *, train: bool = False):
    out = {}
    img_dim, txt_dim = self._out_dims()
    zimg = ztxt = None
    if image is not None:
      kw = {"num_classes": img_dim, "head_zeroinit": False, **dict(self.image or {})}
      zimg, out_img = ViT(**kw, name="img")(image, train=train)
      for k, v in out_img.items():
        out[f"img/{k}"] = v
      zimg = l2_normalize(zimg)
    if text is not None:
      kw = {"num_classes": txt_dim, **dict(self.text or {})}
      ztxt, out_txt = TextTransformer(**kw, name="txt")(text, train=train)
      for k, v in out_txt.items():
        out[f"txt/{k}"] = v
      ztxt = l2_normalize(ztxt)

    t_init = float(np.log(self.temperature_init))
    t = self.param("t", layers.logical(lambda k, s, d: jnp.full(s, t_init, d), (None,)),
                   (1,), jnp.float32)
    b_init = 0.0 if self.bias_init is None else float(self.bias_init)
    b = self.param("b", layers.logical(lambda k, s, d: jnp.full(s, b_init, d), (None,)),
                   (1,), jnp.float32)
    out["t/parameterized"] = t[0]
    out["t"] = jnp.exp(t[0])
    out["b"] = b[0]
    return zimg, ztxt, out
