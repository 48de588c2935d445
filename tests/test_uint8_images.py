"""uint8 images: the pp op keep_uint8 ships pixels as 1 byte each and the image towers map them
to their pixel_range on the device, giving the numbers of the host's value_range(-1, 1)."""
import jax
import numpy as np
import pytest

from big_mm import modalities
from big_mm.input import pipeline, preprocess
from big_mm.models.towers import Towers
from big_mm.models.vit import ViT
from conftest import read_metrics, tiny_config

FLOAT_PP = "decode|resize(36)|random_crop(32)|value_range(-1,1)"
UINT8_PP = "decode|resize(36)|random_crop(32)|keep_uint8"
TINY_VIT = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, pool="map")


def _value_range(x, lo=-1, hi=1):
  return preprocess.apply_pp(preprocess.parse_pp(f"value_range({lo},{hi})"), x, None)


@pytest.mark.parametrize("pp,match", [
    ("decode|keep_uint8|resize(8)", "'keep_uint8' must be the last image op"),
    ("decode|resize(8)|keep_uint8|value_range(-1,1)", "'keep_uint8' must be the last image op"),
    ("decode|value_range(-1,1)|keep_uint8", "'keep_uint8' needs uint8 pixels"),
    ("decode|normalize('clip')|keep_uint8", "'keep_uint8' needs uint8 pixels"),
])
def test_keep_uint8_comes_last_on_uint8_pixels(pp, match):
  with pytest.raises(ValueError, match=match):
    preprocess.parse_pp(pp)


def test_keep_uint8_parses_at_the_end_or_before_naflex():
  assert preprocess.keeps_uint8(UINT8_PP) and not preprocess.keeps_uint8(FLOAT_PP)
  assert [o.name for o in preprocess.parse_pp("decode|keep_uint8|naflex(16, 4)")][-2:] == [
      "keep_uint8", "naflex"]


@pytest.mark.parametrize("pixel_range", [(-1, 1), (0, 1)])
def test_vit_scales_uint8_on_device_as_value_range_does_on_the_host(pixel_range):
  pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  floats = _value_range(pixels, *pixel_range)
  model = ViT(**TINY_VIT, pixel_range=pixel_range)
  params = model.init(jax.random.key(0), floats)
  want, out_f = model.apply(params, floats)
  got, out_u = model.apply(params, pixels)
  assert got.dtype == want.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out_u["stem"], out_f["stem"], rtol=1e-6, atol=1e-6)
  # The mapping itself: 0 -> lo, 255 -> hi.
  stem = lambda x: model.apply(params, x)[1]["stem"]
  np.testing.assert_allclose(stem(np.full((1, 8, 8, 3), 255, np.uint8)),
                             stem(np.full((1, 8, 8, 3), pixel_range[1], np.float32)), atol=1e-6)


def test_limoe_image_stem_scales_uint8_as_vit_does():
  from big_mm.models import get_model  # pylint: disable=g-import-not-at-top
  model = get_model("limoe", towers={"image": {"patch_size": 4}, "text": {"vocab_size": 20}},
                    out_dim=8, width=16, depth=1, mlp_dim=32, num_heads=2)
  pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  text = np.ones((2, 4), np.int32)
  params = model.init(jax.random.key(0), {"image": _value_range(pixels), "text": text})
  want, got = (model.apply(params, {"image": x, "text": text})[0]["image"]
               for x in (_value_range(pixels), pixels))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_naflex_patches_stay_uint8_and_embed_as_the_float_ones():
  """decode|keep_uint8|naflex: uint8 patches whose tower output equals value_range(-1,1)|
  naflex's (padding differs: 0 -> -1 on device, but it is masked)."""
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, s, dtype=np.uint8) for s in [(8, 24, 3), (16, 12, 3)]]

  def batch(pp, uint8):
    ops = preprocess.parse_pp(pp, preprocess.IMAGE)
    ex = [pipeline.image_outputs(preprocess.apply_pp(ops, im, None), uint8) for im in images]
    return {k: np.stack([e[k] for e in ex]) for k in ex[0]}

  u8 = batch("keep_uint8|naflex(12, 4)", True)
  f32 = batch("value_range(-1,1)|naflex(12, 4)", False)
  assert u8["image"].dtype == np.uint8 and f32["image"].dtype == np.float32
  np.testing.assert_array_equal(u8["image_mask"], f32["image_mask"])
  np.testing.assert_allclose(_value_range(u8["image"])[u8["image_mask"]],
                             f32["image"][f32["image_mask"]])
  # Without keep_uint8 the pipeline still casts naflex's uint8 patches to float32 [0, 255].
  plain = batch("naflex(12, 4)", False)
  assert plain["image"].dtype == np.float32 and plain["image"].max() > 1
  model = Towers(towers={"image": dict(TINY_VIT, posemb_grid=3)}, out_dim=8)
  inputs = lambda b: {"image": modalities.model_input(b, "image")}
  params = model.init(jax.random.key(0), inputs(f32))
  want, got = (model.apply(params, inputs(b))[0]["image"] for b in (f32, u8))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pipeline_yields_uint8_batches_of_the_float_pipelines_pixels(data_dir):
  """Same records, same seed: the uint8 batch is the float batch before value_range, at a
  quarter of the bytes."""
  batches = {}
  for pp in (FLOAT_PP, UINT8_PP):
    config = tiny_config(data_dir, **{"input.pp_image": pp})
    it = pipeline.make_train_iterator(config.input, global_batch_size=8, seed=0, sharding=None)
    batches[pp] = next(it)
  u8, f32 = batches[UINT8_PP]["image"], batches[FLOAT_PP]["image"]
  assert u8.dtype == np.uint8 and u8.shape == f32.shape == (8, 32, 32, 3)
  assert u8.nbytes * 4 == f32.nbytes
  np.testing.assert_array_equal(_value_range(u8), f32)
  np.testing.assert_array_equal(batches[UINT8_PP]["text"], batches[FLOAT_PP]["text"])


def test_training_and_evaluators_on_uint8_batches_match_the_float_run(data_dir, tmp_path):
  """A short run (2 steps, retrieval and zero-shot evaluators embedding their images through
  the same tower) with keep_uint8 in every pp: the float run's losses and metrics."""
  from big_mm import train  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  finals = {}
  for name, pp, eval_pp in (("float", FLOAT_PP, common.EVAL_PP),
                            ("uint8", UINT8_PP, "decode|resize(32)|keep_uint8")):
    evals = dict(zeroshot=dict(common.digits_zeroshot_eval(every_steps=0), pp_image=eval_pp,
                               every_steps=None),
                 retrieval=dict(type="retrieval", split="test", pp_image=eval_pp))
    config = tiny_config(data_dir, **{"input.pp_image": pp, "evals": evals, "total_steps": 2})
    train.train(config, str(tmp_path / name))
    finals[name] = read_metrics(str(tmp_path / name))
  pick = lambda rows: [{k: v for k, v in r.items() if k.startswith(("loss", "eval/"))}
                       for r in rows]
  want, got = pick(finals["float"]), pick(finals["uint8"])
  keys = {k for r in want for k in r}
  assert {"loss", "eval/zeroshot/accuracy", "eval/retrieval/txt2img/R@1"} <= keys
  assert [sorted(r) for r in got] == [sorted(r) for r in want]
  for w, g in zip(want, got):
    assert g == pytest.approx(w, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("config_path,call", [
    ("configs/demo_multimae.py", lambda obj, batch: obj.inputs(batch)),
    ("configs/demo_4m_tokenizer.py",
     lambda obj, batch: obj.loss_fn(None, batch, None, extra=None, step=0)),
])
def test_pixel_target_objectives_refuse_uint8_images(config_path, call):
  """MultiMAE and the VQ tokenizers read pixel values as targets: a uint8 batch (keep_uint8)
  is an error naming the fix, not 0-255 targets."""
  from big_mm import config as config_lib, train
  objective = train.build(config_lib.load(config_path, {})).objective
  batch = {"image": np.zeros((2, 32, 32, 3), np.uint8)}
  with pytest.raises(ValueError, match=r"uint8 images from pp op keep_uint8.*value_range"):
    call(objective, batch)
