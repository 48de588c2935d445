"""Tests of big_mm/input/dense.py: dense-map decoding, bad maps, joint geometric augmentation,
and the input.modalities config checks."""
import io
import os
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from big_mm import config as config_lib  # pylint: disable=wrong-import-position
from big_mm.input import dense, preprocess  # pylint: disable=wrong-import-position

H, W = 32, 24  # Not square: a transposed map cannot pass.


def _png(arr, mode=None, fmt="PNG"):
  buf = io.BytesIO()
  Image.fromarray(arr, mode).save(buf, fmt)
  return buf.getvalue()


def _npy(arr):
  buf = io.BytesIO()
  np.save(buf, arr)
  return buf.getvalue()


# ---- decoding ------------------------------------------------------------------------------

def test_decode_depth_units():
  metres = np.linspace(0.5, 9.5, H * W, dtype=np.float32).reshape(H, W)
  mm = np.round(metres * 1000).astype(np.uint16)
  for value in (metres, metres[..., None], metres.astype(np.float64), _npy(metres),
                _png(metres, fmt="TIFF")):  # float: metres as given
    out = dense.decode_depth(value)
    assert out.dtype == np.float32 and out.shape == (H, W)
    np.testing.assert_allclose(out, metres, rtol=1e-6)
  for value in (mm, _png(mm), _npy(mm[..., None])):  # uint16 / 16-bit PNG: millimetres
    out = dense.decode_depth(value)
    assert out.dtype == np.float32 and out.shape == (H, W)
    np.testing.assert_allclose(out, mm / 1000, rtol=1e-6)
  assert Image.open(io.BytesIO(_png(mm))).mode.startswith("I")  # Really a 16-bit PNG.
  np.testing.assert_allclose(dense.decode_depth(np.full((2, 2), 65535, np.uint16)), 65.535)


def test_decode_semseg():
  ids = (np.arange(H * W) % 7).reshape(H, W).astype(np.uint8)
  palette = Image.fromarray(ids, "P")
  palette.putpalette([v for i in range(7) for v in (30 * i, 0, 255 - 30 * i)])
  buf = io.BytesIO()
  palette.save(buf, "PNG")
  big = (np.arange(H * W) * 80).reshape(H, W).astype(np.uint16)  # Ids up to 61k: 16 bit.
  cases = [(ids, ids), (ids[..., None].astype(np.int64), ids), (_png(ids), ids),
           (buf.getvalue(), ids), (_png(big), big), (ids.astype(np.float32), ids),
           (_npy(ids), ids), (ids.tolist(), ids)]
  for value, want in cases:
    out = dense.decode_semseg(value)
    assert out.dtype == np.int32 and out.shape == (H, W)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("name,value,reason", [
    ("depth", b"not a png", "corrupt_depth"),
    ("depth", b"", "corrupt_depth"),
    ("depth", _png(np.zeros((8, 8), np.uint8))[:40], "corrupt_depth"),  # Truncated.
    ("depth", _png(np.zeros((8, 8), np.uint8)), "corrupt_depth"),  # 8 bit: no unit.
    ("depth", np.zeros((8, 8), np.int64), "corrupt_depth"),
    ("depth", 3.5, "corrupt_depth"),
    ("depth", _png(np.zeros((8, 8, 3), np.uint8)), "bad_depth_shape"),
    ("depth", np.zeros((8, 8, 2), np.float32), "bad_depth_shape"),
    ("depth", np.zeros((8,), np.float32), "bad_depth_shape"),
    ("depth", np.zeros((0, 8), np.float32), "bad_depth_shape"),
    ("depth", np.array([[1.0, np.nan]], np.float32), "nonfinite_depth"),
    ("depth", np.array([[1.0, np.inf]], np.float32), "nonfinite_depth"),
    ("semseg", b"\x89PNG\r\n\x1a\n broken", "corrupt_semseg"),
    ("semseg", np.array([[0.5, 1.0]], np.float32), "corrupt_semseg"),
    ("semseg", np.array([[2**40]], np.int64), "corrupt_semseg"),
    ("semseg", _png(np.zeros((8, 8, 3), np.uint8)), "bad_semseg_shape"),
    ("semseg", np.zeros((8, 8, 3), np.uint8), "bad_semseg_shape"),
])
def test_bad_maps(name, value, reason):
  with pytest.raises(preprocess.BadRecord) as e:
    dense.DECODERS[name](value)
  assert e.value.reason == reason


def test_map_size_must_match_image():
  pp = dense.JointPreprocessor("decode|value_range(0,1)")
  image = _png(np.zeros((H, W, 3), np.uint8))
  rng = np.random.default_rng(0)
  for name, good in (("depth", np.ones((H, W), np.float32)), ("semseg", np.ones((H, W), np.uint8))):
    out, _ = pp({"image": image, name: good}, rng)
    assert out[name].shape == (H, W)
    for bad in (good.T, good[:-1]):  # Transposed, one row short.
      with pytest.raises(preprocess.BadRecord) as e:
        pp({"image": image, name: bad}, rng)
      assert e.value.reason == f"bad_{name}_shape"
  with pytest.raises(preprocess.BadRecord) as e:  # The image's own reason comes first.
    pp({"image": b"junk", "depth": b"junk"}, rng)
  assert e.value.reason == "corrupt_image"
  out, _ = pp({"image": image, "depth": None}, rng)  # Absent map: absent output.
  assert set(out) == {"image"}


# ---- joint geometric augmentation -----------------------------------------------------------

def _coord_example(semseg_png=True):
  """Image whose pixel (y, x) is (8x, 8y, 255); semseg / depth hold y*W + x."""
  y, x = np.mgrid[:H, :W]
  rgb = np.stack([8 * x, 8 * y, np.full_like(x, 255)], -1).astype(np.uint8)
  code = y * W + x
  semseg = _png(code.astype(np.uint16)) if semseg_png else code.astype(np.int32)
  return {"image": _png(rgb), "depth": code.astype(np.float32), "semseg": semseg}


def _check_exact(out):
  img = out["image"].astype(np.int64)
  valid = img[..., 2] == 255  # Not revealed by a geometric randaugment op (fill 128).
  assert valid.mean() > 0.3
  code = (img[..., 1] // 8) * W + img[..., 0] // 8
  np.testing.assert_array_equal(out["semseg"][valid], code[valid])
  np.testing.assert_array_equal(out["depth"][valid], code[valid].astype(np.float32))


def _joint_and_plain(pp, example, seed):
  """The joint output, after checking its image equals preprocess.Preprocessor's."""
  out, _ = dense.JointPreprocessor(pp)(example, np.random.default_rng(seed))
  plain, _ = preprocess.Preprocessor(pp)(example, np.random.default_rng(seed))
  np.testing.assert_array_equal(out["image"], plain["image"])
  assert out["depth"].dtype == np.float32 and out["semseg"].dtype == np.int32
  assert out["depth"].shape == out["semseg"].shape == out["image"].shape[:2]
  return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pp", ["decode|random_crop((20, 16))|flip_lr",
                                "decode|flip_lr|central_crop(12)|flip_lr"])
def test_joint_crop_flip_exact(pp, seed):
  out = _joint_and_plain(pp, _coord_example(), seed)
  _check_exact(out)


def _ra_draws(seed, num_layers):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_layers):
    out.append(preprocess.RANDAUGMENT_OPS[int(rng.integers(len(preprocess.RANDAUGMENT_OPS)))])
    rng.random()
  return out


def _seeds(keep, n=3, num_layers=2):
  return [s for s in range(500) if keep(_ra_draws(s, num_layers))][:n]


GEOMETRIC_RA = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


@pytest.mark.parametrize("seed", _seeds(lambda d: all(n in GEOMETRIC_RA for n in d)))
def test_joint_randaugment_geometric_subops_move_maps(seed):
  """Seeds whose randaugment draws only pixel-moving sub-ops: maps follow them exactly."""
  pp = "decode|randaugment(2, 10)|random_crop(16)|flip_lr"
  out = _joint_and_plain(pp, _coord_example(), seed)
  _check_exact(out)
  assert (out["image"][..., 2] == 128).any()  # The ops really moved pixels.
  assert (out["semseg"][out["image"][..., 2] == 128] == 0).all()  # Revealed: 0.


@pytest.mark.parametrize("seed", _seeds(lambda d: not set(d) & set(GEOMETRIC_RA + ("Identity",))))
def test_joint_randaugment_does_not_desync(seed):
  """Photometric randaugment draws: the maps get the crop / flip the image got, as computed
  with preprocess's own ops after the same randaugment draws."""
  pp = "decode|randaugment(2, 10)|random_crop(16)|flip_lr|choose_caption"
  example = dict(_coord_example(), text=["a", "b", "c", "d"])
  out = _joint_and_plain(pp, example, seed)
  rng = np.random.default_rng(seed)
  ops = {o.name: o for o in preprocess.parse_pp(pp)}
  ops["randaugment"](np.zeros((H, W, 3), np.uint8), rng)  # The same draws.
  want = ops["flip_lr"](ops["random_crop"](example["depth"], rng), rng)
  np.testing.assert_array_equal(out["depth"], want)
  np.testing.assert_array_equal(out["semseg"], want.astype(np.int32))
  assert out["text"] == preprocess.Preprocessor(pp)(example, np.random.default_rng(seed))[0][
      "text"]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("pp", ["decode|resize((40, 30))|random_crop(24)|flip_lr",
                                "decode|resize_small(16)|central_crop(12)",
                                "decode|inception_crop(16)|flip_lr|value_range(0, 255)"])
def test_joint_resampling_ops(pp, seed):
  """Bilinear image / depth and nearest semseg: depth = x and semseg = y read back the image's
  R = 8x and G = 8y (away from the borders, where PIL's filters clamp)."""
  y, x = np.mgrid[:H, :W]
  rgb = np.stack([8 * x, 8 * y, np.zeros_like(x)], -1).astype(np.uint8)
  example = {"image": _png(rgb), "depth": x.astype(np.float32), "semseg": y.astype(np.uint8)}
  out = _joint_and_plain(pp, example, seed)
  inner = (slice(2, -2), slice(2, -2))
  img = out["image"].astype(np.float64) / 8
  assert np.abs(out["depth"] - img[..., 0])[inner].max() < 0.15  # Bilinear, as the image.
  assert np.abs(out["semseg"] - img[..., 1])[inner].max() < 0.6  # Nearest: within 1/2 px.
  assert set(np.unique(out["semseg"])) <= set(range(H))


def test_joint_preprocessor_pickles_and_keeps_text_counts():
  from big_mm.input import tokenizer  # pylint: disable=g-import-not-at-top
  tok = tokenizer.Tokenizer(os.path.join(ROOT, "data", "digits_spm.model"))
  pp = pickle.loads(pickle.dumps(dense.JointPreprocessor("decode|flip_lr|tokenize(3)",
                                                         tokenizer=tok)))
  ex = dict(_coord_example(), text="handwritten 1 2 3 4 5")
  out, counts = pp(ex, np.random.default_rng(0))
  assert out["text"].shape == (3,) and counts["text_truncated"] == 1
  out, _ = pp({k: v for k, v in ex.items() if k != "text"}, np.random.default_rng(0),
              optional=("text",))
  assert "text" not in out and out["depth"].shape == (H, W)


def test_every_image_op_has_a_dense_rule():
  image_ops = {n for n, d in preprocess.OPS.items() if d.key == preprocess.IMAGE}
  assert image_ops == set(dense.OP_KINDS)
  with pytest.raises(ValueError, match="shrink_to"):
    dense.JointPreprocessor("decode(shrink_to=16)|resize(16)")


# ---- config ---------------------------------------------------------------------------------

def _validate(**input_changes):
  cfg = config_lib.defaults()
  cfg.total_steps = 1
  for k, v in input_changes.items():
    cfg.input[k] = v
  config_lib.validate(cfg)


def test_config_modalities():
  _validate(modalities=("rgb", "depth", "semseg", "text"))
  _validate(modalities=("rgb", "text"), depth_column="d")
  for mods, match in [(("rgb", "dept"), r"'dept' is not valid.*Did you mean 'depth'"),
                      (("depth", "text"), "include 'rgb'"),
                      (("rgb", "rgb"), "once"),
                      ("rgb", "must be None or a tuple")]:
    with pytest.raises(config_lib.ConfigError, match=match):
      _validate(modalities=mods)
  with pytest.raises(config_lib.ConfigError, match="input.semseg_column"):
    _validate(modalities=("rgb", "semseg"), semseg_column="")
  with pytest.raises(config_lib.ConfigError, match="shrink_to"):
    _validate(modalities=("rgb", "depth"), pp_image="decode(shrink_to=32)|resize(32)")
  _validate(modalities=("rgb", "text"), pp_image="decode(shrink_to=32)|resize(32)")
