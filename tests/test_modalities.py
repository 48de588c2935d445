"""Tests for big_mm.modalities (the modality table) and the towers model built on it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from big_mm import modalities
from big_mm.models.towers import Towers, from_two_towers

TINY = dict(width=32, depth=1, mlp_dim=64, num_heads=4)


@pytest.fixture
def extra_image_modality():
  """A registered third modality (as a family would add one), removed afterwards."""
  mod = modalities.register(modalities.Modality(
      "thermal", "thermal", modalities.IMAGE, np.float32, tower="vit"))
  yield mod
  del modalities.MODALITIES["thermal"]


def test_table_lookups_aliases_and_shapes():
  image = modalities.get("image")
  assert modalities.get("rgb") is image and image.batch_key == "image" and image.scope == "img"
  assert modalities.get("text").scope == "txt" and modalities.get("text").tower
  assert image.example_shape((8, 6), 5) == (8, 6, 3)
  assert modalities.get("depth").example_shape((8, 6), 5) == (8, 6)
  assert modalities.get("text").example_shape((8, 6), 5) == (5,)
  assert modalities.present_key("depth") == "depth_present"
  assert modalities.get("semseg").field({"semseg_column": "seg"}) == "seg"
  assert modalities.get("semseg").field({}) == "semseg"
  assert modalities.get("text").field({"text_column": "caption"}) == "text"  # sources rename
  with pytest.raises(ValueError, match=r"Unknown modality 'dpth'.*Did you mean 'depth'"):
    modalities.get("dpth")
  with pytest.raises(ValueError, match="registered twice"):
    modalities.register(modalities.Modality("img2", "img2", modalities.IMAGE, np.float32,
                                            aliases=("rgb",)))
  assert "img2" not in modalities.MODALITIES


def test_third_tower_by_name_gets_its_own_scope(extra_image_modality):
  model = Towers(towers={"image": dict(TINY, patch_size=4),
                         "thermal": dict(TINY, patch_size=4, pool="gap"),
                         "text": dict(TINY, vocab_size=20)},
                 out_dim={"image": 8, "thermal": 8, "text": 8})
  x = jnp.ones((2, 8, 8, 3))
  inputs = {"image": x, "thermal": x * 0.5, "text": jnp.ones((2, 4), jnp.int32)}
  params = nn.unbox(model.init(jax.random.PRNGKey(0), inputs))["params"]
  assert set(params) == {"img", "thermal", "txt", "t", "b"}
  z, out = model.apply({"params": params}, inputs)
  assert {k: v.shape for k, v in z.items()} == {m: (2, 8) for m in inputs}
  assert "thermal/encoded" in out
  # Addressed by name: one tower alone gives the same embedding.
  z_one, _ = model.apply({"params": params}, {"thermal": x * 0.5})
  np.testing.assert_allclose(z_one["thermal"], z["thermal"], atol=1e-6)


def test_tower_choice_and_errors():
  text_as_vit = Towers(towers={"image": {"tower": "vit", **TINY, "patch_size": 4}}, out_dim=4)
  params = text_as_vit.init(jax.random.PRNGKey(0), {"image": jnp.ones((1, 8, 8, 3))})
  assert "img" in params["params"]
  with pytest.raises(ValueError, match=r"model.towers.image.tower='vitt'.*'vit'"):
    Towers(towers={"image": {"tower": "vitt"}})
  with pytest.raises(ValueError, match=r"model.towers: Unknown modality 'imgae'"):
    Towers(towers={"imgae": {}})
  with pytest.raises(ValueError, match=r"out_dim must be an int or \{modality: int\}"):
    Towers(towers={"image": {}}, out_dim={"text": 8})
  with pytest.raises(ValueError, match="model.towers is empty"):
    Towers(towers={})
  model = Towers(towers={"image": dict(TINY, patch_size=4)}, out_dim=4)
  with pytest.raises(ValueError, match=r"Inputs \['text'\] have no tower"):
    model.init(jax.random.PRNGKey(0), {"image": jnp.ones((1, 8, 8, 3)),
                                       "text": jnp.ones((1, 4), jnp.int32)})


def test_from_two_towers():
  got = from_two_towers(dict(image={"variant": "B/16"}, out_dim=(0, 64), bias_init=-10.0))
  assert got == dict(towers={"image": {"variant": "B/16"}, "text": {}},
                     out_dim={"image": 0, "text": 64}, bias_init=-10.0)
