"""Token-code modalities (kind CODES: tok_rgb / tok_depth / tok_semseg, 4M): the pre-tokenized
dataset tool (tools/tokenize_dataset.py) and the input pipeline's pass-through of the codes."""
import io
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from big_mm import config as config_lib  # pylint: disable=wrong-import-position
from big_mm import modalities  # pylint: disable=wrong-import-position
from big_mm.input import pipeline, sources  # pylint: disable=wrong-import-position
from big_mm.input import preprocess as preprocessing  # pylint: disable=wrong-import-position
from tools import tokenize_dataset  # pylint: disable=wrong-import-position

SPM = os.path.join(ROOT, "data", "scenes_spm.model")
SPLIT = "test"  # 500 records: the only split written (seconds).


class FakeTokenizer:
  """big_mm.models.vq.load's API on a fixed rule: one code per `down` x `down` block, from the
  block mean (rgb: red channel in [-1, 1]; depth: metres; semseg: class ids), in `vocab_size`
  bins. Inputs of another size give another number of codes."""

  def __init__(self, modality, vocab_size=16, down=4, image_size=32):
    self.modality, self.vocab_size, self.down = modality, vocab_size, down
    self.grid = (image_size // down,) * 2
    self.workdir, self.step = f"/fake/{modality}", 7

  @property
  def num_tokens(self):
    return self.grid[0] * self.grid[1]

  def encode(self, x):
    x = x[..., 0] if self.modality == "rgb" else x.astype(jnp.float32)
    b, h, w = x.shape
    d = self.down
    mean = x.reshape(b, h // d, d, w // d, d).mean((2, 4)).reshape(b, -1)
    lo, hi = {"rgb": (-1.0, 1.0), "depth": (0.0, 16.0), "semseg": (0.0, 4.0)}[self.modality]
    return jnp.clip((mean - lo) / (hi - lo) * self.vocab_size, 0,
                    self.vocab_size - 1).astype(jnp.int32)

  def decode(self, codes):
    raise NotImplementedError("not needed by the tool")


def _tokenizers(**kw):
  return {m: FakeTokenizer(m, **kw) for m in ("rgb", "depth", "semseg")}


@pytest.fixture(scope="module")
def tokens_dir(scenes_dir, tmp_path_factory):
  """A data dir with multimodal_scenes and, written by the tool, multimodal_scenes_tokens."""
  d = str(tmp_path_factory.mktemp("tfds_tokens"))
  shutil.copytree(os.path.join(scenes_dir, "multimodal_scenes"),
                  os.path.join(d, "multimodal_scenes"))
  lines = []
  report = tokenize_dataset.tokenize_dataset("multimodal_scenes", _tokenizers(), data_dir=d,
                                             splits=[SPLIT], batch=128, log=lines.append)
  return d, report, lines


def _decoded(modality, value):
  if modality == "rgb":
    return np.asarray(Image.open(io.BytesIO(value)), np.float32) / 127.5 - 1
  return np.asarray(value)


# ---- the tool -----------------------------------------------------------------------------

def test_tool_keeps_fields_and_adds_codes(tokens_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  d, report, lines = tokens_dir
  src = tfds.builder("multimodal_scenes", data_dir=d)
  out = tfds.builder_from_directory(f"{d}/multimodal_scenes_tokens/1.0.0")
  assert report["splits"][SPLIT]["examples"] == 500 and not report["splits"][SPLIT]["dropped"]
  features = out.info.features
  assert set(features.keys()) == set(src.info.features.keys()) | {
      "tok_rgb", "tok_depth", "tok_semseg"}
  for k, f in src.info.features.items():
    assert type(features[k]) is type(f) and features[k].np_dtype == f.np_dtype, k
    assert getattr(features[k], "shape", None) == getattr(f, "shape", None), k
  assert features["label"].names == src.info.features["label"].names
  assert features["tok_rgb"].shape == (64,) and features["tok_rgb"].np_dtype == np.int32
  assert "/fake/depth step 7" in out.info.description
  skip = {"image": tfds.decode.SkipDecoding()}
  a = src.as_data_source(SPLIT, decoders=skip)
  b = out.as_data_source(SPLIT, decoders=skip)
  assert len(b) == len(a) == 500
  toks = _tokenizers()
  for i in (0, 1, 250, 499):  # The source's order, every field unchanged.
    ra, rb = a[i], b[i]
    for k in src.info.features.keys():
      assert np.array_equal(np.asarray(ra[k]), np.asarray(rb[k])), (i, k)
    for m, field in tokenize_dataset.FIELDS.items():
      want = np.asarray(toks[m].encode(jnp.asarray(_decoded(m, ra[field]))[None]))[0]
      assert rb[f"tok_{m}"].dtype == np.int32
      assert np.array_equal(rb[f"tok_{m}"], want), (i, m)
  # The summary: rate and code usage per modality.
  assert any("examples/s" in line for line in lines)
  used = [line for line in lines if line.startswith("tok_rgb: ")]
  assert len(used) == 1 and "codes used" in used[0] and "perplexity" in used[0]
  usage = report["usage"]["semseg"].counts
  assert usage.sum() == 500 * 64 and usage.shape == (16,)


def test_tool_drops_and_counts_bad_records(tokens_dir, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  d, _, _ = tokens_dir
  real, calls = tokenize_dataset._decode, []  # pylint: disable=protected-access

  def decode(modality, value):  # Records 0, 3, 6, ...: corrupt depth; 1, 4, ...: 16x32.
    calls.append(None)
    if len(calls) % 3 == 1:
      raise preprocessing.BadRecord("corrupt_depth")
    return real(modality, value)[:16] if len(calls) % 3 == 2 else real(modality, value)

  monkeypatch.setattr(tokenize_dataset, "_decode", decode)
  report = tokenize_dataset.tokenize_dataset(
      "multimodal_scenes", {"depth": FakeTokenizer("depth")}, data_dir=d, out_name="dropped",
      splits=[SPLIT], batch=64, log=lambda _: None)
  assert report["splits"][SPLIT]["dropped"] == {"corrupt_depth": 167, "wrong_size": 167}
  skip = {"image": tfds.decode.SkipDecoding()}
  src = tfds.builder("multimodal_scenes", data_dir=d).as_data_source(SPLIT, decoders=skip)
  out = tfds.builder_from_directory(f"{d}/dropped/1.0.0").as_data_source(SPLIT, decoders=skip)
  assert [int(out[i]["id"]) for i in range(len(out))] == [
      int(src[i]["id"]) for i in range(2, 500, 3)]


def test_tool_errors(tokens_dir, capsys):
  d, _, _ = tokens_dir
  with pytest.raises(config_lib.ConfigError, match="exists already"):
    tokenize_dataset.tokenize_dataset("multimodal_scenes", _tokenizers(), data_dir=d,
                                      splits=[SPLIT])
  # A tokenizer for 64x64 inputs makes 256 codes of the 32x32 images, not its 16x16 grid.
  with pytest.raises(config_lib.ConfigError, match=r"\(16, 16\) grid .* trained on another size"):
    tokenize_dataset.tokenize_dataset("multimodal_scenes", {"rgb": FakeTokenizer(
        "rgb", image_size=64)}, data_dir=d, out_name="other", splits=[SPLIT])
  with pytest.raises(sources.DatasetNotFound, match="multimodal_scene"):
    tokenize_dataset.tokenize_dataset("multimodal_scene", _tokenizers(), data_dir=d)
  with pytest.raises(config_lib.ConfigError, match="not splits of"):
    tokenize_dataset.tokenize_dataset("multimodal_scenes", _tokenizers(), data_dir=d,
                                      out_name="other", splits=["validation"])
  # The command line: user errors end with exit code 1 and their message.
  for argv, match in [
      (["--data", "multimodal_scenes", "--tokenizer", "rgbb=/x"], "MODALITY one of"),
      (["--data", "multimodal_scenes", "--tokenizer", f"rgb={d}/nope"], "no such directory"),
      (["--data", "multimodal_scenes", "--tokenizer", f"depth={d}"], "not a big_mm training"),
  ]:
    assert tokenize_dataset.main(argv + ["--data_dir", d]) == 1
    assert match in capsys.readouterr().err
  assert tokenize_dataset.main(["--data", "multimodal_scenes"]) == 2
  assert "Missing --tokenizer" in capsys.readouterr().err


def test_tokenizer_flag():
  assert tokenize_dataset.parse_tokenizer_flag("rgb=/a,depth=/b") == {"rgb": "/a",
                                                                       "depth": "/b"}
  with pytest.raises(config_lib.ConfigError, match="once"):
    tokenize_dataset.parse_tokenizer_flag("rgb=/a,rgb=/b")


# ---- the modality and the pipeline --------------------------------------------------------

def test_codes_modality():
  mod = modalities.get("tok_depth")
  assert (mod.kind, mod.batch_key, mod.field({}), mod.dtype) == ("codes", "tok_depth",
                                                                 "tok_depth", np.int32)
  with pytest.raises(ValueError, match="which the objective builds"):
    mod.example_shape((32, 32), 12)


def _cfg(d, **kw):
  cfg = dict(data="multimodal_scenes_tokens", split=SPLIT, data_dir=d, tokenizer=SPM,
             text_len=12, pp_image="decode|resize(32)|value_range(-1,1)", num_workers=0,
             prefetch=1, shuffle=True,
             modalities=("tok_rgb", "tok_depth", "tok_semseg", "text", "depth", "semseg"))
  cfg.update(kw)
  return cfg


def test_codes_pass_through(tokens_dir):
  d, _, _ = tokens_dir
  cfg = _cfg(d)
  full = config_lib.defaults()
  full.total_steps = 1
  full.input.update(cfg)
  config_lib.validate(full)  # No "rgb" needed with token codes; resize(32) is a no-op.
  b = next(iter(pipeline.make_eval_batches(cfg, SPLIT, 8, None)))
  src = sources.open_source("multimodal_scenes_tokens", SPLIT, d)
  for m in ("tok_rgb", "tok_depth", "tok_semseg"):
    assert b[m].dtype == np.int32 and b[m].shape == (8, 64)
    assert (b[f"{m}_present"] == 1).all()
    for i in range(8):
      assert np.array_equal(b[m][i], src[i][m])
  assert b["image"].shape == (8, 32, 32, 3) and b["depth"].shape == (8, 32, 32)
  np.testing.assert_allclose(b["depth"][3], src[3]["depth"])
  it = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0, sharding=None)
  t = next(it)
  assert t["tok_semseg"].shape == (4, 64) and t["tok_semseg"].dtype == np.int32
  # The codes are the ones of the same record's (unmoved) image and maps.
  rgb = np.asarray(FakeTokenizer("rgb").encode(jnp.asarray(t["image"])))
  assert np.array_equal(rgb, t["tok_rgb"])
  semseg = np.asarray(FakeTokenizer("semseg").encode(jnp.asarray(t["semseg"])))
  assert np.array_equal(semseg, t["tok_semseg"])


def test_codes_refuse_moving_pixels(tokens_dir):
  d, _, _ = tokens_dir
  full = config_lib.defaults()
  full.total_steps = 1
  for pp, op in [("decode|flip_lr|value_range(-1,1)", "flip_lr"),
                 ("decode|inception_crop(32)|value_range(-1,1)", "inception_crop"),
                 ("decode|randaugment(2,5)|value_range(-1,1)", "randaugment")]:
    full.input.update(_cfg(d, pp_image=pp))
    with pytest.raises(config_lib.ConfigError, match=f"token.*pp op '{op}' moves the image"):
      config_lib.validate(full)
    with pytest.raises(ValueError, match=f"pp op '{op}' moves the image"):
      pipeline.make_eval_batches(_cfg(d, pp_image=pp), SPLIT, 8, None)
  # flip_lr is fine without token codes (MultiMAE's augmentation).
  full.input.update(_cfg(d, pp_image="decode|flip_lr|value_range(-1,1)",
                         modalities=("rgb", "depth")))
  config_lib.validate(full)
  # A resize that changes the size is refused when it runs.
  ev = pipeline.make_eval_batches(_cfg(d, pp_image="decode|resize(16)|value_range(-1,1)"),
                                  SPLIT, 8, None)
  with pytest.raises(ValueError, match="'resize' changed the image from 32x32 to 16x16"):
    next(iter(ev))


class _BadCodes:
  """Records of multimodal_scenes_tokens with tok_rgb cut (index % 5 == 1) or absent (== 2)."""

  def __init__(self, base):
    self.base = base

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    ex = dict(self.base[i])
    if i % 5 == 1:
      ex["tok_rgb"] = ex["tok_rgb"][:63]
    elif i % 5 == 2:
      del ex["tok_rgb"]
    return ex


def test_bad_codes_skipped_and_counted(tokens_dir, monkeypatch):
  d, _, _ = tokens_dir
  real = sources.open_source
  monkeypatch.setattr(sources, "open_source",
                      lambda *a, **k: _BadCodes(real(*a, **k)))
  cfg = _cfg(d, split=f"{SPLIT}[:20]", modalities=("tok_rgb", "depth"))
  ev = pipeline.make_eval_batches(cfg, f"{SPLIT}[:20]", 10, None)
  batches = list(ev)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.tolist() == [int(i % 5 not in (1, 2)) for i in range(20)]
  assert ev.stats() == {"skipped/bad_codes": 4, "skipped/missing_codes": 4}
  it = pipeline.make_train_iterator(cfg, global_batch_size=6, seed=0, sharding=None)
  for _ in range(2):  # 12 good examples = every good record of epoch 0.
    assert next(it)["tok_rgb"].shape == (6, 64)
  stats = it.stats()
  assert stats["skipped/bad_codes"] >= 4 and stats["skipped/missing_codes"] >= 4
