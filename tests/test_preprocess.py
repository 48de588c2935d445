"""Tests of the preprocessing op library: ops, parsing, decoding, bad records in the pipeline."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from big_mm import config as config_lib
from big_mm.input import pipeline, preprocess, sources, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(ROOT, "data", "digits_spm.model")
BadRecord = preprocess.BadRecord


def _rng(seed=0):
  return np.random.default_rng(seed)


def _encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _photo(h=48, w=64, seed=0):
  """A smooth random RGB image (compresses like a photo; every op visibly changes it)."""
  small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), np.uint8)
  return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _run(pp, value, seed=0):
  return preprocess.apply_pp(preprocess.parse_pp(pp), value, _rng(seed))


# ---- parsing -------------------------------------------------------------------------

@pytest.mark.parametrize("pp,key,match", [
    ("decode|rezise(32)", None, r"Unknown pp op 'rezise'.*Valid ops:.*randaugment\(num_layers"
                                r"=2, magnitude=10\).*tokenize\(length\)"),
    ("decode|randaugment(2, 11)", None, r"magnitude must be a number in \[0, 10\].*"
                                        r"Signature: randaugment\(num_layers=2, magnitude=10\)"),
    ("decode|normalize('cifar')", None, r"imagenet.*normalize\(mean, std=None\)"),
    ("decode|normalize((1, 2), (1, 1, 1))", None, r"mean must be 3 numbers"),
    ("decode(shrink=3)", None, r"unexpected keyword argument 'shrink'.*Signature: decode"),
    ("decode(max_pixels=len('x'))", None, r"Python literals"),
    ("decode|inception_crop(32, 50, 10)", None, r"area_max.*inception_crop\(size"),
    ("decode|value_range(-1,1)|randaugment", None, r"'randaugment' needs uint8.*value_range"),
    ("tokenize(8)|lowercase", None, r"'tokenize' must be the last text op"),
    ("decode|resize(8)|tokenize(8)", "image", r"\['tokenize'\] do not act on 'image'.*"
                                              r"Ops that do: decode"),
    ("lowercase|resize(8)", "text", r"\['resize'\] do not act on 'text'"),
])
def test_parse_errors(pp, key, match):
  with pytest.raises(ValueError, match=match):
    preprocess.parse_pp(pp, key)


def test_parse_keys_and_string_form():
  ops = preprocess.parse_pp(
      "decode|resize(224)|random_crop(224)|flip_lr|value_range(-1,1)|tokenize(64)")
  assert [o.key for o in ops] == ["image"] * 5 + ["text"]
  assert ops[-1].args == (64,)
  (crop,) = preprocess.parse_pp("inception_crop(224, area_min=8)")
  assert crop.args == (224, 8, 100, 0.75, None)


def test_config_validates_pp():
  ok = config_lib.load(os.path.join(ROOT, "configs", "demo.py"),
                       {"input.pp_text": "choose_caption|lowercase|tokenize(16)"})
  assert ok.input.pp_text == "choose_caption|lowercase|tokenize(16)"
  for overrides, match in [
      ({"input.pp_image": "decode|resize(224)|sharpen"}, r"input.pp_image: Unknown pp op "
                                                          r"'sharpen'.*Valid ops"),
      ({"input.pp_image": "decode|tokenize(16)"}, r"input.pp_image.*do not act on 'image'"),
      ({"input.pp_text": "lowercase|tokenize(64)"}, r"tokenize\(64\) but input.text_len=16"),
      ({"input.pp_text": "lowercase"}, r"must end with tokenize\(16\)"),
      ({"input.pp_text": "tokenize(16)", "input.tokenizer": None}, r"input.tokenizer is not set"),
  ]:
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.load(os.path.join(ROOT, "configs", "demo.py"), overrides)


# ---- decode --------------------------------------------------------------------------

def test_decode_formats_to_rgb():
  photo = _photo(12, 10)
  alpha = np.zeros((12, 10), np.uint8)
  alpha[:, 5:] = 255
  rgba = Image.fromarray(np.dstack([photo, alpha]), "RGBA")
  palette = Image.fromarray(photo).convert("P", palette=Image.ADAPTIVE, colors=8)
  palette_transparent = palette.copy()
  palette_transparent.info["transparency"] = int(np.asarray(palette)[0, 0])
  grey16 = Image.fromarray(np.full((12, 10), 32896, np.uint16))  # 32896 = 128.5 * 256.
  cases = {
      "grey": (_encode(Image.fromarray(photo[..., 0], "L"), "PNG"),
               np.repeat(photo[..., :1], 3, -1), 0),
      "rgba": (_encode(rgba, "PNG"), None, 0),
      "cmyk": (_encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95,
                       subsampling=0), photo, 16),
      "palette": (_encode(palette, "PNG"), np.asarray(palette.convert("RGB")), 0),
      "palette_transparent": (_encode(palette_transparent, "PNG"), None, 0),
      "grey16": (_encode(grey16, "PNG"), np.full((12, 10, 3), 128, np.uint8), 1),
      "webp": (_encode(Image.fromarray(photo), "WEBP", lossless=True), photo, 0),
      "jpeg": (_encode(Image.fromarray(photo), "JPEG", quality=95, subsampling=0), photo, 16),
  }
  for name, (data, want, tol) in cases.items():
    out = _run("decode", data)
    assert out.shape == (12, 10, 3) and out.dtype == np.uint8, name
    if want is not None:
      assert np.abs(out.astype(int) - want).max() <= tol, name
  # Transparent pixels are composited onto white; opaque ones keep their colour.
  out = _run("decode", cases["rgba"][0])
  assert (out[:, :5] == 255).all() and (out[:, 5:] == photo[:, 5:]).all()
  out = _run("decode", cases["palette_transparent"][0])
  assert (out[0, 0] == 255).all()
  # Already-decoded arrays (grey, uint16) from a source.
  assert _run("decode", photo[..., 0]).shape == (12, 10, 3)
  assert (_run("decode", np.full((2, 2, 3), 65535, np.uint16)) == 255).all()


def test_decode_exif_orientation():
  photo = _photo(12, 20)
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  data = _encode(Image.fromarray(photo), "JPEG", quality=95, subsampling=0,
                 exif=exif.tobytes())
  out = _run("decode", data).astype(int)
  assert out.shape == (20, 12, 3)
  assert np.abs(out - np.rot90(photo, k=-1)).mean() < 4
  assert np.abs(out - np.rot90(photo, k=1)).mean() > 20


def test_decode_shrink_to():
  photo = _photo(160, 240)
  jpeg = _encode(Image.fromarray(photo), "JPEG", quality=95)
  assert _run("decode(1000000, 50)", jpeg).shape == (80, 120, 3)  # 1/2: 80 >= 50 > 40.
  assert _run("decode(1000000, 20)", jpeg).shape == (20, 30, 3)  # 1/8.
  full = _run("decode|resize(40)", jpeg).astype(int)
  assert np.abs(_run("decode(1000000, 40)|resize(40)", jpeg) - full).mean() < 4
  png = _encode(Image.fromarray(photo), "PNG")
  assert _run("decode(shrink_to=20)", png).shape == (160, 240, 3)  # Not a JPEG: full size.


# ---- image ops -----------------------------------------------------------------------

def test_image_ops_shapes_ranges_determinism():
  img = _photo(48, 64)
  png = _encode(Image.fromarray(img), "PNG")
  for pp, shape, dtype, lo, hi in [
      ("decode|resize(20)", (20, 20, 3), np.uint8, 0, 255),
      ("decode|resize((20, 30))", (20, 30, 3), np.uint8, 0, 255),
      ("decode|resize_small(24)", (24, 32, 3), np.uint8, 0, 255),
      ("decode|central_crop(16)", (16, 16, 3), np.uint8, 0, 255),
      ("decode|random_crop((16, 8))", (16, 8, 3), np.uint8, 0, 255),
      ("decode|inception_crop(24)", (24, 24, 3), np.uint8, 0, 255),
      ("decode|flip_lr", (48, 64, 3), np.uint8, 0, 255),
      ("decode|randaugment(2, 9)", (48, 64, 3), np.uint8, 0, 255),
      ("decode|value_range(-1,1)", (48, 64, 3), np.float32, -1, 1),
      ("decode|resize(8)|value_range(0,1)", (8, 8, 3), np.float32, 0, 1),
      ("decode|normalize('clip')", (48, 64, 3), np.float32, -1.8, 2.2),
  ]:
    a, b = _run(pp, png, seed=3), _run(pp, png, seed=3)
    assert a.shape == shape and a.dtype == dtype, pp
    assert a.min() >= lo and a.max() <= hi, pp
    assert (a == b).all(), pp
  assert (_run("decode|central_crop(16)", png) == img[16:32, 24:40]).all()
  flips = {bool((_run("decode|flip_lr", png, s) == img[:, ::-1]).all()) for s in range(8)}
  assert flips == {True, False}
  crops = [_run("decode|inception_crop(24)", png, s) for s in range(4)]
  assert any((c != crops[0]).any() for c in crops[1:])
  mean, std = preprocess.NORMALIZE_CONSTANTS["imagenet"]
  np.testing.assert_allclose(_run("decode|normalize('imagenet')", png),
                             (img / 255 - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_run("decode|normalize((0.5, 0.5, 0.5), (0.25, 0.5, 1))", png),
                             (img / 255 - 0.5) / (0.25, 0.5, 1), rtol=1e-5, atol=1e-5)


def test_inception_box_area_and_ratio():
  rng, box = _rng(0), preprocess._inception_box  # pylint: disable=protected-access
  ratios = []
  for _ in range(200):
    top, left, ch, cw = box(100, 150, rng, 0.05, 1.0, 0.75, 4 / 3)
    assert 0 <= top and top + ch <= 100 and 0 <= left and left + cw <= 150
    assert 0.04 <= ch * cw / 15000 <= 1.0
    ratios.append(cw / ch)
  assert 0.7 < min(ratios) < 0.8 and 1.25 < max(ratios) < 1.4
  assert box(10, 100, rng, 0.9, 1.0, 0.75, 4 / 3) == (0, 43, 10, 13)  # Fallback: ratio 4/3.


def test_randaugment_deterministic_and_changes():
  img = _photo(32, 32)
  outs = [_run("decode|randaugment(2, 10)", img, s) for s in range(6)]
  assert (outs[0] == _run("decode|randaugment(2, 10)", img, 0)).all()
  changed = [not (o == img).all() for o in outs]
  assert sum(changed) >= 4  # Only Identity twice leaves it as is.
  assert len({o.tobytes() for o in outs}) >= 4
  assert (_run("decode|randaugment(0, 10)", img) == img).all()
  # Every op of the list runs on a small image at full magnitude, keeping shape and dtype.
  im = Image.fromarray(img)
  for name in preprocess.RANDAUGMENT_OPS:
    for sign in (1.0, -1.0):
      out = np.asarray(preprocess._ra_op(name, im, 1.0, sign))  # pylint: disable=protected-access
      assert out.shape == img.shape and out.dtype == np.uint8, name
  assert len(preprocess.RANDAUGMENT_OPS) == 14


# ---- text ops ------------------------------------------------------------------------

def test_captions_and_text_ops():
  assert preprocess.captions(" A Cat ") == ["A Cat"]
  assert preprocess.captions(b"caf\xc3\xa9") == ["café"]
  assert preprocess.captions('["one", " two ", ""]') == ["one", "two"]
  assert preprocess.captions(np.array([b"x", b"y"], object)) == ["x", "y"]
  assert preprocess.captions("[not json]") == ["[not json]"]
  caps = ["Zero", "One", "Two"]
  chosen = {_run("choose_caption|lowercase", caps, s)[0] for s in range(30)}
  assert chosen == {"zero", "one", "two"}
  assert _run("choose_caption", caps, 5) == _run("choose_caption", caps, 5)


def test_tokenize_and_truncation_count():
  tok = tokenizer.Tokenizer(TOKENIZER)
  pp = preprocess.Preprocessor("lowercase|tokenize(6)", tokenizer=tok)
  out, counts = pp({"text": "Handwritten 7"}, _rng())
  assert out["text"].dtype == np.int32 and out["text"].shape == (6,)
  assert counts["text_truncated"] == 0
  assert (out["text"] == tok.encode("handwritten 7", 6)[0]).all()
  out, counts = pp({"text": "a photo of the number seven in black ink"}, _rng())
  assert counts["text_truncated"] == 1 and out["text"][-1] == tok.eos_id
  with pytest.raises(ValueError, match="tokenizer"):
    preprocess.Preprocessor("tokenize(6)")


# ---- bad records ---------------------------------------------------------------------

def _png(h=40, w=40):
  return _encode(Image.fromarray(_photo(h, w)), "PNG")


def _bad_records():
  """reason -> a record that must be skipped with that reason (pp: see _PP_BAD)."""
  jpeg = _encode(Image.fromarray(_photo(40, 40)), "JPEG")
  return {
      "corrupt_image": {"image": b"\x89PNG\r\n\x1a\n not a png", "text": "ok"},
      "truncated_jpeg": {"image": jpeg[:len(jpeg) // 2], "text": "ok"},
      "empty_image": {"image": b"", "text": "ok"},
      "empty_array": {"image": np.zeros((0, 5, 3), np.uint8), "text": "ok"},
      "image_too_large": {"image": _png(60, 60), "text": "ok"},
      "too_small": {"image": _png(20, 40), "text": "ok"},
      "empty_caption": {"image": _png(), "text": ["", "  "]},
      "bad_caption_encoding": {"image": _png(), "text": b"\xff\xfe bad"},
      "missing_text": {"image": _png()},
      "missing_image": {"text": "ok"},
  }


_REASONS = {"truncated_jpeg": "corrupt_image", "empty_array": "empty_image",
            "missing_text": "missing_field", "missing_image": "missing_field"}
_PP_BAD = "decode(2000)|random_crop(32)|value_range(-1,1)"  # 2000 pixels max.


def test_bad_records_raise_reason():
  pp = preprocess.Preprocessor(_PP_BAD + "|tokenize(8)",
                               tokenizer=tokenizer.Tokenizer(TOKENIZER))
  for name, record in _bad_records().items():
    if name in ("image_too_large", "too_small"):
      continue
    with pytest.raises(BadRecord) as e:
      pp({**record, "image": record.get("image")}, _rng())
    assert e.value.reason == _REASONS.get(name, name), name
  big = preprocess.Preprocessor("decode(3000)|random_crop(32)")
  for data, reason in [(_png(60, 60), "image_too_large"), (_png(20, 40), "too_small")]:
    with pytest.raises(BadRecord) as e:
      big({"image": data}, _rng())
    assert e.value.reason == reason


def test_pipeline_skips_and_counts_bad_records(monkeypatch):
  tok = tokenizer.Tokenizer(TOKENIZER)
  long_text = "a photo of the number seven in black ink"
  good = [{"image": _png(), "text": long_text if i % 3 == 0 else f"{i}"} for i in range(8)]
  bad = list(_bad_records().values())
  records = good[:4] + bad + good[4:]  # The last record read is good.
  monkeypatch.setattr(sources, "open_source", lambda *a, **k: records)
  cfg = dict(data="in_memory", tokenizer=TOKENIZER, text_len=6,
             pp_image="decode(3000)|random_crop(32)|flip_lr|value_range(-1,1)",
             pp_text="choose_caption|tokenize(6)", shuffle=False, num_workers=0, prefetch=1)
  it = pipeline.make_train_iterator(cfg, global_batch_size=8, seed=0, sharding=None)
  batch = next(it)  # The 8 good records, reading exactly one epoch.
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["text"].shape == (8, 6) and batch["text"].dtype == np.int32
  assert [t for t in tok.decode(batch["text"]) if t.isdigit()] == ["1", "2", "4", "5", "7"]
  want = {"skipped/corrupt_image": 2, "skipped/empty_image": 2, "skipped/image_too_large": 1,
          "skipped/too_small": 1, "skipped/empty_caption": 1,
          "skipped/bad_caption_encoding": 1, "skipped/missing_field": 2, "text_truncated": 3}
  assert it.stats() == want
  state = it.get_state()
  assert state["counts"] == {"text_truncated": 3}
  assert next(it)["image"].shape == (8, 32, 32, 3)  # Second epoch: same skips again.
  assert it.stats()["skipped/missing_field"] == 4 and it.stats()["text_truncated"] == 6
  it2 = pipeline.make_train_iterator(cfg, global_batch_size=8, seed=0, sharding=None)
  it2.set_state(state)
  assert it2.stats() == want


def test_pipeline_all_bad_records_raise(monkeypatch):
  monkeypatch.setattr(sources, "open_source", lambda *a, **k: [{"image": _png()}] * 10)
  cfg = dict(data="in_memory", tokenizer=TOKENIZER, text_len=6,
             pp_image="decode|value_range(-1,1)", shuffle=False)
  it = pipeline.make_train_iterator(cfg, global_batch_size=2, seed=0, sharding=None)
  with pytest.raises(pipeline.SourceFailed, match=r"501 of the last 501 records read from "
                     r"input.data 'in_memory' are bad.*missing_field.*input.text_column"):
    next(it)


def test_eval_text_optional(monkeypatch):
  records = [{"image": _png(), "label": i} for i in range(5)]
  monkeypatch.setattr(sources, "open_source", lambda *a, **k: records)
  cfg = dict(data="in_memory", tokenizer=TOKENIZER, text_len=6,
             pp_image="decode|central_crop(32)|value_range(-1,1)")
  batches = list(pipeline.make_eval_batches(cfg, "test", 4, None))
  assert set(batches[0]) == {"image", "label", "mask"}
  assert [b["mask"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 0, 0, 0]]
