"""Tests of the input stack: demo dataset, tokenizer, pp ops, train/eval pipelines."""
import glob
import io
import json
import os
import re
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position

from big_mm.input import pipeline, preprocess, sources, tokenizer  # pylint: disable=wrong-import-position
from data import digits_captions  # pylint: disable=wrong-import-position

TOKENIZER = os.path.join(ROOT, "data", "digits_spm.model")
PP_TRAIN = "decode|resize(36)|random_crop(32)|flip_lr|value_range(-1,1)"


def _cfg(data_dir, **kw):
  cfg = dict(data="digits_captions", split="train", data_dir=data_dir, tokenizer=TOKENIZER,
             text_len=12, pp_image=PP_TRAIN, num_workers=0, prefetch=1, shuffle=True)
  cfg.update(kw)
  return cfg


# ---- dataset -------------------------------------------------------------------------

def test_builder_splits(data_dir):
  tr = sources.open_source("digits_captions", "train", data_dir)
  te = sources.open_source("digits_captions", "test", data_dir)
  assert (len(tr), len(te)) == (1497, 300)
  assert sources.num_examples("digits_captions", "test", data_dir) == 300
  ids_tr = {int(tr[i]["id"]) for i in range(len(tr))}
  ids_te = [int(te[i]["id"]) for i in range(len(te))]
  assert len(set(ids_te)) == 300 and not ids_tr & set(ids_te)
  assert ids_tr | set(ids_te) == set(range(1797))
  labels = [int(te[i]["label"]) for i in range(len(te))]
  assert np.bincount(labels).tolist() == [30] * 10  # Stratified.
  ex = te[0]
  assert isinstance(ex["image"], bytes) and ex["image"][:4] == b"\x89PNG"
  assert isinstance(ex["text"], str)
  assert np.asarray(Image.open(io.BytesIO(ex["image"]))).shape == (32, 32, 3)
  word, num = digits_captions.WORDS[int(ex["label"])], str(int(ex["label"]))
  assert word in ex["text"].split() or num in ex["text"].split()
  assert ex["text"] == digits_captions.caption(int(ex["label"]), int(ex["id"]))
  assert sources.label_names("digits_captions", data_dir)[7] == "seven"
  assert "tensorflow" not in sys.modules


def test_builder_deterministic(data_dir, tmp_path):
  digits_captions.build(str(tmp_path))
  version = str(digits_captions.DigitsCaptions.VERSION)
  files = sorted(glob.glob(os.path.join(data_dir, "digits_captions", version, "*.array_record*")))
  assert len(files) == 2
  for f in files:
    other = os.path.join(tmp_path, "digits_captions", version, os.path.basename(f))
    with open(f, "rb") as a, open(other, "rb") as b:
      assert a.read() == b.read(), f


def test_missing_dataset_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"digits_captions.*build_demo.py"):
    sources.open_source("digits_captions", "train", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"tfds build mnist"):
    sources.open_source("mnist", "train", str(tmp_path))


# ---- tokenizer -----------------------------------------------------------------------

def test_tokenizer():
  tok = tokenizer.Tokenizer(TOKENIZER)
  assert (tok.pad_id, tok.eos_id) == (0, 1) and 10 < tok.vocab_size <= 128
  texts = ["a photo of the number seven", "handwritten 7"]
  ids = tok.encode(texts, 16)
  assert ids.dtype == np.int32 and ids.shape == (2, 16)
  for row in ids:
    n = int(np.argmax(row == tok.eos_id))
    assert row[n] == 1 and (row[n + 1:] == 0).all() and (row[:n] > 1).all()
  assert tok.decode(ids) == texts
  short = tok.encode(texts, 3)
  assert short.shape == (2, 3) and (short[:, -1] == tok.eos_id).all()
  assert (short[:, :2] == ids[:, :2]).all()
  assert tok.encode("handwritten 7", 1).tolist() == [[1]]
  import pickle  # pylint: disable=g-import-not-at-top
  assert (pickle.loads(pickle.dumps(tok)).encode(texts, 16) == ids).all()


def test_tokenizer_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.model.*make_tokenizer\.py"):
    tokenizer.Tokenizer(str(tmp_path / "nope.model"))


def test_make_tokenizer_deterministic(tmp_path):
  from tools import make_tokenizer  # pylint: disable=g-import-not-at-top
  texts = [digits_captions.caption(i % 10, i) for i in range(300)]
  a = make_tokenizer.train(texts, str(tmp_path / "a.model"), **make_tokenizer.DEMO_SETTINGS)
  b = make_tokenizer.train(texts, str(tmp_path / "b.model"), **make_tokenizer.DEMO_SETTINGS)
  assert open(a, "rb").read() == open(b, "rb").read()
  tok = tokenizer.Tokenizer(a)
  assert (tok.pad_id, tok.eos_id) == (0, 1)


# ---- preprocessing -------------------------------------------------------------------

@pytest.mark.parametrize("pp,match", [
    ("decode|rezise(32)", r"Unknown pp op 'rezise'.*Valid ops:.*resize\(size\)"),
    ("decode|resize(32, 3)", r"resize\(size\)"),
    ("decode|resize(-2)", r"positive"),
    ("decode|resize(x)", r"literals.*resize\(size\)"),
    ("decode|value_range(-1)", r"value_range\(lo, hi"),
    ("decode|random_crop(32", r"missing '\)'"),
    ("resize(32)|decode", r"first op"),
    ("", r"non-empty"),
])
def test_parse_pp_errors(pp, match):
  with pytest.raises(ValueError, match=match):
    preprocess.parse_pp(pp)


def _encode(img, fmt):
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def test_decode_modes():
  rng = np.random.default_rng(0)
  grey = Image.fromarray(np.full((5, 7), 100, np.uint8), "L")
  rgba = Image.fromarray(np.dstack([np.full((5, 7, 3), 50, np.uint8),
                                    np.full((5, 7), 255, np.uint8)]), "RGBA")
  cmyk = Image.new("CMYK", (7, 5), (0, 0, 0, 0))  # White.
  ops = preprocess.parse_pp("decode")
  for data, expect in [(_encode(grey, "PNG"), 100), (_encode(rgba, "PNG"), 50),
                       (_encode(cmyk, "JPEG"), 255), (_encode(grey.convert("RGB"), "JPEG"), 100)]:
    out = preprocess.apply_pp(ops, data, rng)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8
    assert abs(int(np.median(out)) - expect) <= 2
  with pytest.raises(preprocess.BadRecord) as e:
    preprocess.apply_pp(ops, b"\x89PNG not really", rng)
  assert e.value.reason == "corrupt_image"


def test_pp_ops():
  img = np.arange(40 * 30 * 3, dtype=np.uint8).reshape(40, 30, 3)
  data = _encode(Image.fromarray(img), "PNG")
  pp = preprocess.parse_pp("decode|resize(36)|random_crop(32)|flip_lr|value_range(-1,1)")
  a = preprocess.apply_pp(pp, data, np.random.default_rng(1))
  b = preprocess.apply_pp(pp, data, np.random.default_rng(1))
  assert a.shape == (32, 32, 3) and a.dtype == np.float32
  assert (a == b).all() and a.min() >= -1 and a.max() <= 1
  c = preprocess.apply_pp(preprocess.parse_pp("decode|central_crop((20, 10))"), data, None)
  assert (c == img[10:30, 10:20]).all()
  with pytest.raises(preprocess.BadRecord, match="too_small"):
    preprocess.apply_pp(preprocess.parse_pp("decode|random_crop(64)"), data,
                        np.random.default_rng(0))
  r = preprocess.apply_pp(preprocess.parse_pp("decode|resize_small(20)"), data, None)
  assert r.shape == (27, 20, 3)


# ---- training iterator ---------------------------------------------------------------

class _IdTextSource:
  """A source whose text is the example index (to read back which examples came)."""

  def __init__(self, base, corrupt=()):
    self.base, self.corrupt = base, set(corrupt)

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    ex = dict(self.base[i], text=str(i))
    if i in self.corrupt:
      ex["image"] = b"garbage"
    return ex


@pytest.fixture
def id_source(monkeypatch):
  """Patches sources.open_source; returns a dict to set `corrupt` indices."""
  opts = {"corrupt": ()}
  real = sources.open_source
  monkeypatch.setattr(sources, "open_source",
                      lambda *a, **k: _IdTextSource(real(*a, **k), opts["corrupt"]))
  return opts


def _ids(tok, batch):
  return [int(t) for t in tok.decode(batch["text"])]


def test_train_global_arrays(data_dir):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  it = pipeline.make_train_iterator(_cfg(data_dir), global_batch_size=16, seed=0,
                                    sharding=sharding)
  b = next(it)
  assert set(b) == {"image", "text"}
  assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["text"].shape == (16, 12) and b["text"].dtype == np.int32
  for v in b.values():
    assert isinstance(v, jax.Array) and v.sharding == sharding
    assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape[0] == 2
  assert float(b["image"].min()) >= -1 and float(b["image"].max()) <= 1
  assert ((np.asarray(b["text"]) == 1).sum(1) == 1).all()  # One EOS each.
  with pytest.raises(ValueError, match=r"global_batch_size=10.*process_count=4"):
    pipeline.make_train_iterator(_cfg(data_dir), global_batch_size=10, seed=0,
                                 sharding=None, process_index=0, process_count=4)


def test_train_processes_cover_epochs(data_dir, id_source):
  del id_source
  tok = tokenizer.Tokenizer(TOKENIZER)
  cfg = _cfg(data_dir, split="test", pp_image="decode|value_range(0,1)")  # 300 examples.
  seen = []
  for p in range(2):
    it = pipeline.make_train_iterator(cfg, global_batch_size=20, seed=3, sharding=None,
                                      process_index=p, process_count=2)
    seen.append([_ids(tok, next(it)) for _ in range(30)])  # Two epochs.
    assert seen[-1][0].__len__() == 10
  for epoch in range(2):
    e0 = sum(seen[0][15 * epoch:15 * (epoch + 1)], [])
    e1 = sum(seen[1][15 * epoch:15 * (epoch + 1)], [])
    assert not set(e0) & set(e1)
    assert sorted(e0 + e1) == list(range(300))
  assert sum(seen[0][:15], []) != sum(seen[0][15:], [])  # Reshuffled every epoch.


def test_train_determinism_and_seed(data_dir):
  def first(seed):
    it = pipeline.make_train_iterator(_cfg(data_dir), global_batch_size=8, seed=seed,
                                      sharding=None)
    return [next(it) for _ in range(2)]
  a, b, c = first(0), first(0), first(1)
  for x, y in zip(a, b):
    assert (x["image"] == y["image"]).all() and (x["text"] == y["text"]).all()
  assert not (a[0]["text"] == c[0]["text"]).all()


def test_train_resume_mid_epoch(data_dir):
  cfg = _cfg(data_dir)
  it = pipeline.make_train_iterator(cfg, global_batch_size=8, seed=0, sharding=None)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  it2 = pipeline.make_train_iterator(cfg, global_batch_size=8, seed=0, sharding=None)
  it2.set_state(state)
  got = [next(it2) for _ in range(3)]
  for x, y in zip(want, got):
    assert (x["image"] == y["image"]).all() and (x["text"] == y["text"]).all()
  bad = dict(state, seed=5)
  with pytest.raises(ValueError, match="seed"):
    it2.set_state(bad)


def test_train_workers_match_in_process(data_dir):
  its = [pipeline.make_train_iterator(_cfg(data_dir, num_workers=w), global_batch_size=8,
                                      seed=0, sharding=None) for w in (0, 1)]
  try:
    for _ in range(2):
      x, y = next(its[0]), next(its[1])
      assert (x["image"] == y["image"]).all() and (x["text"] == y["text"]).all()
    state = json.loads(json.dumps(its[1].get_state()))
    x = next(its[0])
    its[1].set_state(state)
    y = next(its[1])
    assert (x["image"] == y["image"]).all() and (x["text"] == y["text"]).all()
  finally:
    for it in its:
      it.close()


def test_train_skips_corrupt(data_dir, id_source):
  id_source["corrupt"] = set(range(0, 300, 7))  # 43 bad of 300.
  tok = tokenizer.Tokenizer(TOKENIZER)
  it = pipeline.make_train_iterator(_cfg(data_dir, split="test"), global_batch_size=16,
                                    seed=0, sharding=None)
  ids = []
  for _ in range(16):  # 256 = every good example (257) but one.
    b = next(it)
    assert b["image"].shape == (16, 32, 32, 3) and b["text"].shape == (16, 12)
    ids += _ids(tok, b)
  assert not set(ids) & id_source["corrupt"] and len(set(ids)) == 256
  # Every position read so far was a good example or a counted bad one.
  state = it.get_state()
  n_bad = state["grain"]["next_index"] - 256
  assert n_bad >= 42 and it.stats() == {"skipped/corrupt_image": n_bad}
  assert state["skipped"] == {"corrupt_image": n_bad}


def _tar_part(folder, n, garbage=()) -> str:
  """A one-shard tar source spec of n records (captions "0".."n-1"); the records in
  `garbage` hold bytes that are no image."""
  folder.mkdir()
  image = _encode(Image.new("RGB", (6, 5), (90, 40, 200)), "PNG")
  with tarfile.open(folder / "00000.tar", "w") as tar:
    for i in range(n):
      for ext, data in (("png", b"garbage" if i in garbage else image), ("txt", str(i).encode())):
        info = tarfile.TarInfo(f"{i:09d}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return f"tar:{folder}/{{00000..00000}}.tar"


def _batches_until_failure(it, limit=50):
  """Batches `it` yields before raising SourceFailed (and that error)."""
  for n in range(limit):
    try:
      next(it)
    except pipeline.SourceFailed as e:
      return n, e
  raise AssertionError(f"no SourceFailed in {limit} batches; stats {it.stats()}")


@pytest.mark.parametrize("failure", ["garbage", "deleted"])
def test_mixture_part_that_fails_entirely_stops_the_run(data_dir, tmp_path, failure):
  """Every record of one mixture part bad -- its images garbage, or its shard deleted after
  it was indexed (every read raises) -- stops the run with an error naming that part, once
  more than max_bad_fraction of its last 1000 reads failed; the iterator state carries the
  count across a resume."""
  bad = _tar_part(tmp_path / "bad", 20, garbage=range(20) if failure == "garbage" else ())
  cfg = _cfg(data_dir, split="test", data=(("digits_captions", 0.1), (bad, 0.9)))
  it, resumed = [pipeline.make_train_iterator(cfg, global_batch_size=16, seed=0, sharding=None)
                 for _ in range(2)]
  if failure == "deleted":  # Gone after it was indexed: reads raise FileNotFoundError.
    os.remove(tmp_path / "bad" / "00000.tar")
  assert next(it)["image"].shape == (16, 32, 32, 3)  # The good part's records.
  state = json.loads(json.dumps(it.get_state()))
  n, error = _batches_until_failure(it)
  reason = {"garbage": "corrupt_image", "deleted": "read"}[failure]
  hint = {"garbage": "Its images do not decode", "deleted": "Its files cannot be read"}[failure]
  assert str(error).startswith(
      f"501 of the last 501 records read from part {bad!r} of the input.data mixture are bad "
      f"(input.max_bad_fraction=0.5 allows 500 per 1000): {{{reason!r}: 501}}; last: ")
  assert hint in str(error) and "input.drop_failing_parts=True" in str(error)
  # ~10% of the reads are good: 501 bad ones come within ~560 reads, i.e. ~3 batches.
  assert n + 1 <= 5 and it.stats() == {f"skipped/{reason}": 500}
  resumed.set_state(state)
  n_resumed, again = _batches_until_failure(resumed)
  assert n_resumed == n and str(again).split("; last: ")[0] == str(error).split("; last: ")[0]


def test_mixture_part_with_some_bad_records_keeps_training(data_dir, tmp_path, caplog):
  """A part with 40% bad records (below max_bad_fraction) trains on, over several windows
  of 1000 reads; each bad read is skipped and counted."""
  garbage = {0, 1, 5, 6, 10, 11, 15, 16}
  bad = _tar_part(tmp_path / "bad", 20, garbage=garbage)
  cfg = _cfg(data_dir, split="test", data=(("digits_captions", 0.1), (bad, 0.9)))
  it = pipeline.make_train_iterator(cfg, global_batch_size=64, seed=0, sharding=None)
  tok = tokenizer.Tokenizer(TOKENIZER)
  captions = []
  for _ in range(40):
    captions += tok.decode(next(it)["text"])
  reads = it.get_state()["grain"]["next_index"]
  assert reads > 3 * 1000 / 0.9  # > 3 windows of the bad part.
  assert it.stats() == {"skipped/corrupt_image": reads - 40 * 64}
  tar_ids = {int(c) for c in captions if c.isdigit()}
  assert tar_ids == set(range(20)) - garbage
  assert "Skipping bad record" in caplog.text and repr(bad) in caplog.text


def test_drop_failing_parts(data_dir, tmp_path, caplog):
  """input.drop_failing_parts: a failing mixture part is dropped with an error-level log
  naming it and training goes on with the other parts; the drop survives a resume; a
  single source is never dropped."""
  bad = _tar_part(tmp_path / "bad", 20, garbage=range(20))
  cfg = _cfg(data_dir, split="test", data=(("digits_captions", 0.1), (bad, 0.9)),
             drop_failing_parts=True)
  it = pipeline.make_train_iterator(cfg, global_batch_size=16, seed=0, sharding=None)
  with caplog.at_level("ERROR"):
    for _ in range(6):
      next(it)
  errors = [r for r in caplog.records if r.levelname == "ERROR"]
  assert len(errors) == 1 and errors[0].getMessage().startswith(
      f"Dropping part {bad!r} of the input.data mixture for the rest of the run")
  stats = it.stats()
  assert stats["skipped/corrupt_image"] == 501 and stats["skipped/part_dropped"] > 0
  state = json.loads(json.dumps(it.get_state()))
  assert state["dropped_parts"] == [bad]
  resumed = pipeline.make_train_iterator(cfg, global_batch_size=16, seed=0, sharding=None)
  resumed.set_state(state)
  for _ in range(30):  # > 1000 reads of the bad part: never read again.
    next(resumed)
  assert resumed.stats()["skipped/corrupt_image"] == 501
  assert resumed.stats()["skipped/part_dropped"] > stats["skipped/part_dropped"] + 900
  single = pipeline.make_train_iterator(_cfg(data_dir, data=bad, drop_failing_parts=True),
                                        global_batch_size=16, seed=0, sharding=None)
  with pytest.raises(pipeline.SourceFailed, match=rf"from input.data {re.escape(repr(bad))} "
                     r"are bad.*raise input.max_bad_fraction"):
    next(single)


# ---- eval batches --------------------------------------------------------------------

def test_eval_batches(data_dir, id_source):
  del id_source
  tok = tokenizer.Tokenizer(TOKENIZER)
  cfg = _cfg(data_dir, pp_image="decode|value_range(-1,1)")
  ev = pipeline.make_eval_batches(cfg, "test", 64, None)
  batches = list(ev)
  assert len(ev) == len(batches) == 5
  ids, labels = [], []
  for b in batches:
    assert set(b) == {"image", "text", "label", "mask"}
    assert b["image"].shape == (64, 32, 32, 3) and b["label"].dtype == np.int32
    m = b["mask"].astype(bool)
    ids += [int(t) for t, k in zip(tok.decode(b["text"]), m) if k]
    labels += b["label"][m].tolist()
  assert ids == list(range(300))
  assert int(sum(b["mask"].sum() for b in batches)) == 300
  assert batches[-1]["mask"].tolist() == [1] * 44 + [0] * 20
  src = sources.open_source("digits_captions", "test", data_dir)
  assert labels == [int(src[i]["label"]) for i in range(300)]
  # Two processes: contiguous halves of every global batch.
  halves = [list(pipeline.make_eval_batches(cfg, "test", 64, None, process_index=p,
                                            process_count=2)) for p in range(2)]
  for s in range(5):
    for k in ("image", "mask", "label"):
      full = np.concatenate([halves[0][s][k], halves[1][s][k]])
      assert (full == batches[s][k]).all()


def test_eval_global_arrays(data_dir):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  ev = pipeline.make_eval_batches(_cfg(data_dir, pp_image="decode|value_range(-1,1)"),
                                  "test", 128, sharding)
  b = next(iter(ev))
  assert b["mask"].shape == (128,) and b["label"].sharding == sharding


# ---- input.modalities (MultiMAE: depth, semseg; big_mm/input/dense.py) -------------------

MODALITIES = ("rgb", "depth", "semseg", "text")
MODAL_KEYS = {"image", "depth", "semseg", "text", "depth_present", "semseg_present",
              "text_present"}


def _mm_cfg(scenes_dir, **kw):
  return _cfg(scenes_dir, **{"data": "multimodal_scenes", "modalities": MODALITIES, **kw})


def test_modalities_batch_aligned(scenes_dir):
  """Eval batches are ordered (example i = record i); a crop + flip pp moves values without
  changing them, so the crop window found from the image must give the maps too."""
  cfg = _mm_cfg(scenes_dir, pp_image="decode|random_crop(24)|flip_lr|value_range(0,255)")
  b = next(iter(pipeline.make_eval_batches(cfg, "test", 8, None)))
  assert set(b) == MODAL_KEYS | {"label", "mask"}
  assert b["image"].shape == (8, 24, 24, 3) and b["image"].dtype == np.float32
  assert b["depth"].shape == (8, 24, 24) and b["depth"].dtype == np.float32
  assert b["semseg"].shape == (8, 24, 24) and b["semseg"].dtype == np.int32
  assert b["text"].shape == (8, 12) and b["text"].dtype == np.int32
  for m in ("depth", "semseg", "text"):
    assert b[f"{m}_present"].dtype == np.int32 and b[f"{m}_present"].tolist() == [1] * 8
  src = sources.open_source("multimodal_scenes", "test", scenes_dir)
  windows = set()
  for i in range(8):
    rec = src[i]
    rgb = np.asarray(Image.open(io.BytesIO(rec["image"])))
    fields = {"image": rgb, "depth": rec["depth"], "semseg": rec["semseg"]}
    def view(x, t, l, f):
      x = x[t:t + 24, l:l + 24]
      return x[:, ::-1] if f else x
    matches = [(t, l, f) for t in range(9) for l in range(9) for f in (0, 1)
               if all((view(v, t, l, f) == b[k][i]).all() for k, v in fields.items())]
    assert matches, f"example {i}: image, depth and semseg are not the same crop/flip"
    windows.add(matches[0])
  assert len(windows) > 4  # Really random crops.
  # Image and text draws are those of the same pp without modalities.
  plain = next(iter(pipeline.make_eval_batches(dict(cfg, modalities=None), "test", 8, None)))
  assert set(plain) == {"image", "text", "label", "mask"}
  for k in plain:
    assert (plain[k] == b[k]).all()
  # Only the listed modalities.
  b = next(pipeline.make_train_iterator(_mm_cfg(scenes_dir, modalities=("rgb", "depth")),
                                        global_batch_size=8, seed=0, sharding=None))
  assert set(b) == {"image", "depth", "depth_present"}


class _ModalSource:
  """multimodal_scenes records with a modality absent or broken, by index mod 10."""

  def __init__(self, base):
    self.base = base

  def __len__(self):
    return len(self.base)

  def __getitem__(self, i):
    ex, k = dict(self.base[i]), i % 10
    if k == 1:
      ex["depth"] = None
    elif k == 2:
      del ex["semseg"]
    elif k == 3:
      ex["text"] = None
    elif k == 4:
      ex["depth"] = b"garbage"
    elif k == 5:
      ex["semseg"] = ex["semseg"][:16]
    elif k == 6:
      ex["depth"] = np.where(ex["depth"] > 5, np.nan, ex["depth"]).astype(np.float32)
    elif k == 7:
      ex["semseg"] = _encode(Image.fromarray(np.repeat(ex["semseg"][..., None], 3, -1)), "PNG")
    elif k == 8:  # A 16-bit PNG in millimetres: fine.
      mm = np.round(ex["depth"] * 1000).astype(np.uint16)
      ex["depth"] = _encode(Image.fromarray(mm), "PNG")
    return ex


_MODAL_BAD = {4: "corrupt_depth", 5: "bad_semseg_shape", 6: "nonfinite_depth",
              7: "bad_semseg_shape"}


def test_modalities_absent_and_bad_maps(scenes_dir, monkeypatch):
  real = sources.open_source
  monkeypatch.setattr(sources, "open_source", lambda *a, **k: _ModalSource(real(*a, **k)))
  cfg = _mm_cfg(scenes_dir, pp_image="decode|value_range(-1,1)")
  ev = pipeline.make_eval_batches(cfg, "test[:40]", 8, None)
  batches = list(ev)
  b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
  src = real("multimodal_scenes", "test[:40]", scenes_dir)
  for i in range(40):
    k, rec = i % 10, src[i]
    assert b["mask"][i] == (k not in _MODAL_BAD), i
    if k in _MODAL_BAD:
      continue
    assert b["depth_present"][i] == (k != 1) and b["semseg_present"][i] == (k != 2)
    assert b["text_present"][i] == (k != 3)
    np.testing.assert_allclose(b["depth"][i], 0 if k == 1 else rec["depth"], atol=5e-4)
    assert (b["semseg"][i] == (0 if k == 2 else rec["semseg"])).all()
    assert (b["text"][i] == 0).all() == (k == 3)
  assert ev.stats() == {"skipped/bad_semseg_shape": 8, "skipped/corrupt_depth": 4,
                        "skipped/nonfinite_depth": 4}
  it = pipeline.make_train_iterator(dict(cfg, split="test[:40]"), global_batch_size=8, seed=0,
                                    sharding=None)
  for _ in range(4):  # 32 good examples > 24 per epoch: every record of epoch 0 read.
    t = next(it)
    assert set(t) == MODAL_KEYS and t["depth"].shape == (8, 32, 32)
    for m in ("depth", "semseg"):
      assert (t[m][t[f"{m}_present"] == 0] == 0).all()
  stats = it.stats()
  assert {k for k in stats if k.startswith("skipped/")} == {
      "skipped/bad_semseg_shape", "skipped/corrupt_depth", "skipped/nonfinite_depth"}
  assert stats["skipped/bad_semseg_shape"] >= 8 and stats["skipped/corrupt_depth"] >= 4


def test_modalities_missing_field_error(data_dir, scenes_dir):
  cfg = _cfg(data_dir, modalities=("rgb", "depth", "text"))
  msg = (r"input.modalities names 'depth' \(field 'depth'\) but dataset 'digits_captions' has "
         r"fields \['id', 'image', 'label', 'text'\]; its modalities: image, text")
  with pytest.raises(ValueError, match=msg):
    pipeline.make_train_iterator(cfg, global_batch_size=8, seed=0, sharding=None)
  with pytest.raises(ValueError, match=msg):
    pipeline.make_eval_batches(cfg, "test", 8, None)
  with pytest.raises(ValueError, match=r"'semseg' \(field 'seg'\).*semseg_column"):
    pipeline.make_train_iterator(_mm_cfg(scenes_dir, semseg_column="seg"),
                                 global_batch_size=8, seed=0, sharding=None)


# ---- binding mode (input.modalities with audio / points / vec_*; N-modal binding) ----------

def _binding_parts(tmp_path):
  """Two jsonl sources with different subsets: (vec_a, vec_b, text) and (vec_b, image); a
  short vector (bad) and a record with none of the modalities (missing) in the second."""
  rng = np.random.default_rng(0)
  png = tmp_path / "digit.png"
  Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(png)
  with open(tmp_path / "ab.jsonl", "w") as f:
    for i in range(6):
      f.write(json.dumps({"vec_a": [i, 1, 0], "vec_b": [0, i, 1], "text": f"digit {i}"}) + "\n")
  with open(tmp_path / "bi.jsonl", "w") as f:
    for i in range(6):
      f.write(json.dumps({"vec_b": [9, i, 9], "image": str(png)}) + "\n")
    f.write(json.dumps({"vec_b": [1, 2], "image": str(png)}) + "\n")
    f.write(json.dumps({"other": 1}) + "\n")
  return (f"jsonl:{tmp_path}/ab.jsonl", f"jsonl:{tmp_path}/bi.jsonl")


def test_binding_batches_mix_modality_subsets(tmp_path):
  """Every listed modality is in every batch (static shapes); absent ones are zeros with
  "{m}_present" 0; bad values and records with none of the modalities are skipped and
  counted."""
  ab, bi = _binding_parts(tmp_path)
  cfg = dict(data=((ab, 1.0), (bi, 1.0)), split="train", tokenizer=TOKENIZER, text_len=6,
             pp_image="decode|resize(8)|value_range(-1,1)", num_workers=0, prefetch=1,
             modalities=("image", "vec_a", "vec_b", "text"),
             pp_modalities={"vec_a": "vector(3)", "vec_b": "vector(3)"})
  it = pipeline.make_train_iterator(cfg, global_batch_size=8, seed=0, sharding=None)
  rows = []
  for _ in range(6):
    b = next(it)
    assert {k: v.shape for k, v in b.items()} == {
        "image": (8, 8, 8, 3), "image_present": (8,), "vec_a": (8, 3), "vec_a_present": (8,),
        "vec_b": (8, 3), "vec_b_present": (8,), "text": (8, 6), "text_present": (8,)}
    rows += [{k: v[i] for k, v in b.items()} for i in range(8)]
  first = [r for r in rows if r["vec_a_present"]]
  second = [r for r in rows if r["image_present"]]
  assert first and second and len(first) + len(second) == len(rows)
  for r in first:  # (vec_a, vec_b, text): no image.
    assert r["text_present"] == r["vec_b_present"] == 1 and r["image_present"] == 0
    assert not r["image"].any() and r["vec_b"][2] == 1 and r["text"].any()
  for r in second:  # (vec_b, image): no vec_a, no text.
    assert (r["vec_a_present"], r["text_present"], r["vec_b_present"]) == (0, 0, 1)
    assert not r["vec_a"].any() and not r["text"].any() and r["vec_b"][0] == 9
    assert r["image"].min() < 0 < r["image"].max()
  stats = it.stats()
  assert stats["skipped/bad_vector"] >= 1 and stats["skipped/missing_field"] >= 1


def test_binding_source_errors(tmp_path):
  """A listed modality no source has, or a source with none of them, is an error naming it."""
  ab, _ = _binding_parts(tmp_path)
  cfg = dict(data=ab, split="train", pp_image="decode|resize(8)", num_workers=0,
             modalities=("vec_a", "vec_c"), pp_modalities={"vec_a": "vector(3)",
                                                          "vec_c": "vector(3)"})
  with pytest.raises(ValueError, match=r"names 'vec_c' \(field 'vec_c'\).*columns\['vec_c'\]"):
    pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0, sharding=None)
  cfg.update(modalities=("vec_c",), pp_modalities={"vec_c": "vector(3)"},
             columns={"vec_c": "vec_a"})  # input.columns renames the field.
  b = next(pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0, sharding=None))
  assert b["vec_c_present"].all() and b["vec_c"][:, 1].tolist() == [1, 1, 1, 1]
  with pytest.raises(ValueError, match=r"a source of .* has none of them"):
    pipeline.make_train_iterator(dict(cfg, columns=None, data=((ab, 1.0), (ab, 1.0))),
                                 global_batch_size=4, seed=0, sharding=None)
  with pytest.raises(sources.SpecError, match="tar shards hold image-text records"):
    pipeline.make_train_iterator(dict(cfg, data=f"tar:{tmp_path}/x.tar"), global_batch_size=4,
                                 seed=0, sharding=None)


def test_text_prefix(data_dir):
  """input.prefix_column -> batch["prefix"]: the field's tokens without EOS, 0-padded to
  prefix_len; truncations counted; a missing or empty prefix is all pad."""
  tok = tokenizer.Tokenizer(TOKENIZER)
  full = tok.encode("handwritten 7", 8)[0]
  n = int(np.argmax(full == tok.eos_id))
  ids, truncated = pipeline._tokenize_prefix(tok, "handwritten 7", 8)
  assert ids.dtype == np.int32 and ids.tolist() == full[:n].tolist() + [0] * (8 - n)
  assert not truncated
  assert pipeline._tokenize_prefix(tok, [b"handwritten 7", "other"], 8)[0].tolist() == ids.tolist()
  for empty in (None, "", " ", []):
    ids, truncated = pipeline._tokenize_prefix(tok, empty, 4)
    assert ids.tolist() == [0] * 4 and not truncated
  ids, truncated = pipeline._tokenize_prefix(tok, "handwritten 7", n - 1)
  assert ids.tolist() == full[:n - 1].tolist() and truncated

  # The captions as 2-token prefixes.
  cfg = _cfg(data_dir, prefix_column="text", prefix_len=2)
  it = pipeline.make_train_iterator(cfg, global_batch_size=16, seed=0, sharding=None)
  b = next(it)
  assert b["prefix"].shape == (16, 2) and b["prefix"].dtype == np.int32
  text = b["text"]
  lengths = np.where((text == tok.eos_id).any(1), np.argmax(text == tok.eos_id, 1), 99)
  np.testing.assert_array_equal(b["prefix"], np.where(np.arange(2) < lengths[:, None],
                                                      text[:, :2], 0))
  assert it.stats().get("prefix_truncated", 0) == int(np.sum(lengths > 2)) > 0
  ev = next(iter(pipeline.make_eval_batches(cfg, "test", 8, None)))
  assert ev["prefix"].shape == (8, 2)
  with pytest.raises(ValueError, match=r"prefix_column='text' needs input.prefix_len >= 1"):
    pipeline.make_train_iterator(_cfg(data_dir, prefix_column="text"), global_batch_size=8,
                                 seed=0, sharding=None)


# ---- several captions per image (input.captions_per_example, split_long_captions) -----

def _caption_table(tmp_path, texts) -> str:
  """A parquet table: image i (a digit PNG) with caption cell texts[i] (a str or a list)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  images = [digits_captions.to_png(np.full((8, 8), i % 17)) for i in range(len(texts))]
  path = str(tmp_path / "table.parquet")
  pq.write_table(pa.table({"image": images, "caption": texts}), path)
  return f"parquet:{path}"


def test_captions_per_example_draws_k_captions_of_each_image(tmp_path):
  """text int32 [B, k, L]: k different captions of the record where it has >= k, else its
  captions cycled in a random order (counted as text_repeated); a new draw each epoch."""
  tok = tokenizer.Tokenizer(TOKENIZER)
  words = digits_captions.WORDS
  texts = [[f"handwritten {n}", f"a drawing of a {n}", f"the digit {w}", f"a small {w}"][:c]
           for n, (w, c) in enumerate(zip(words, (4, 3, 2, 1, 4, 3)))]
  cfg = dict(data=_caption_table(tmp_path, texts), tokenizer=TOKENIZER, text_len=12,
             pp_image="decode|resize(32)|value_range(-1,1)", shuffle=False,
             captions_per_example=3)
  it = pipeline.make_train_iterator(cfg, global_batch_size=6, seed=0, sharding=None)
  epochs = [next(it) for _ in range(2)]
  for b in epochs:
    assert b["text"].shape == (6, 3, 12) and b["text"].dtype == np.int32
    for row, caps in zip(b["text"], texts):
      drawn = tok.decode(row)
      if len(caps) >= 3:
        assert len(set(drawn)) == 3 and set(drawn) <= set(caps), (drawn, caps)
      else:  # cycled: every caption, each floor(3/n) or ceil(3/n) times
        assert set(drawn) == set(caps) and max(map(drawn.count, caps)) == -(-3 // len(caps))
  assert it.stats()["text_repeated"] == 2 * 2  # records with 2 and 1 captions, 2 epochs
  assert not np.array_equal(epochs[0]["text"], epochs[1]["text"])
  again = pipeline.make_train_iterator(cfg, global_batch_size=6, seed=0, sharding=None)
  np.testing.assert_array_equal(next(again)["text"], epochs[0]["text"])
  # Eval batches (retrieval, zero-shot) keep one caption per image.
  assert next(iter(pipeline.make_eval_batches(cfg, "train", 6, None)))["text"].shape == (6, 12)
  with pytest.raises(ValueError, match="choose_caption keeps only one"):
    pipeline.make_train_iterator(dict(cfg, pp_text="choose_caption|tokenize(12)"),
                                 global_batch_size=6, seed=0, sharding=None)


def test_split_long_captions():
  """A caption longer than the text length becomes its sentences, and a sentence that is
  still too long, runs of whole words that fit."""
  fits = lambda text: len(text.split()) <= 3
  assert preprocess.split_long_caption("a b c", fits) == ["a b c"]
  assert preprocess.split_long_caption("a b. c d e f g h!\nbig word; i", fits) == [
      "a b.", "c d e", "f g h!", "big word;", "i"]
  assert preprocess.split_long_caption("abcdefgh-as-one-word", lambda t: len(t) < 5) == [
      "abcdefgh-as-one-word"]
  rng = np.random.default_rng(0)
  assert sorted(preprocess.sample_captions(["a", "b"], 5, rng)) in (
      ["a", "a", "a", "b", "b"], ["a", "a", "b", "b", "b"])


def test_split_long_captions_in_the_pipeline(tmp_path):
  """input.split_long_captions: a long caption's sub-captions are the captions drawn (none
  truncated), counted as text_split; without it the caption is truncated."""
  tok = tokenizer.Tokenizer(TOKENIZER)
  sentences = ["a drawing of a 3", "an image of the numeral three", "handwritten 3"]
  long = ". ".join(sentences) + "."
  assert tok.encode_with_info([long], 12)[1][0]  # too long for 12 tokens
  cfg = dict(data=_caption_table(tmp_path, [long, "handwritten 4"]), tokenizer=TOKENIZER,
             text_len=12, pp_image="decode|resize(32)|value_range(-1,1)", shuffle=False)
  truncating = pipeline.make_train_iterator(cfg, global_batch_size=2, seed=0, sharding=None)
  next(truncating)
  assert truncating.stats() == {"text_truncated": 1}
  for k in (1, 2):
    it = pipeline.make_train_iterator(dict(cfg, split_long_captions=True, captions_per_example=k),
                                      global_batch_size=2, seed=0, sharding=None)
    text = next(it)["text"]
    assert text.shape == ((2, 12) if k == 1 else (2, k, 12))
    drawn = tok.decode(text[0].reshape(-1, 12))
    assert len(set(drawn)) == k and set(drawn) <= set(tok.decode(tok.encode(
        [f"{s}." for s in sentences], 12))), drawn
    counted = {key: n for key, n in it.stats().items() if n}
    assert counted == ({"text_split": 1} if k == 1 else {"text_split": 1, "text_repeated": 1})
