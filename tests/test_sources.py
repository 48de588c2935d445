"""Tests of the file-backed data sources (tar shards, tables, mixtures), specs, converter."""
import ast
import collections
import glob
import io
import json
import os
import pickle
import re
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from big_mm import config as config_lib  # pylint: disable=wrong-import-position
from big_mm.input import files, mixture, pipeline, preprocess, sources, tokenizer, webdataset  # pylint: disable=wrong-import-position
from big_mm.input.preprocess import BadRecord  # pylint: disable=wrong-import-position

TOKENIZER = os.path.join(ROOT, "data", "digits_spm.model")
# Captions are record ids ("7", "104"): the digits tokenizer gives them back exactly.
TAR_IDS = list(range(12))  # 3 shards x 4 keys.
TABLE_IDS = {"parquet": list(range(100, 106)), "csv": list(range(200, 205)),
             "jsonl": list(range(300, 307))}


def _image(i: int, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((6, 5, 3), (i * 20) % 256, np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


def _add(tar, name, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_shard(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      _add(tar, name, data)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Tiny fixtures: 3 tar shards (PNG/JPEG, txt/json captions), a parquet table with image
  bytes, a CSV with relative image paths, a JSONL with absolute ones."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("sources")
  (d / "shards").mkdir()
  for s in range(3):
    members = []
    for j in range(4):
      i = 4 * s + j
      key = f"{s:05d}/{i:09d}"  # img2dataset's layout.
      members.append((f"{key}.{'png' if i % 2 else 'jpg'}", _image(i, "PNG" if i % 2 else "JPEG")))
      if i % 3:
        members.append((f"{key}.txt", str(i).encode()))
      members.append((f"{key}.json", json.dumps({"caption": str(i), "url": f"u{i}",
                                                  "alt": f"alt {i}"}).encode()))
    _write_shard(d / "shards" / f"{s:05d}.tar", members)
  pq.write_table(pa.table({"jpg": [_image(i, "PNG") for i in TABLE_IDS["parquet"]],
                           "caption": [str(i) for i in TABLE_IDS["parquet"]]}),
                 d / "pairs.parquet")
  (d / "img").mkdir()
  for i in TABLE_IDS["csv"] + TABLE_IDS["jsonl"]:
    (d / "img" / f"{i}.png").write_bytes(_image(i, "PNG"))
  with open(d / "pairs.csv", "w") as f:
    f.write("image_path,text\n" + "".join(f"img/{i}.png,{i}\n" for i in TABLE_IDS["csv"]))
  with open(d / "pairs.jsonl", "w") as f:
    for i in TABLE_IDS["jsonl"]:
      f.write(json.dumps({"file": str(d / "img" / f"{i}.png"), "sentence": str(i)}) + "\n")
  return d


def _specs(d):
  return {"tar": f"tar:{d}/shards/{{00000..00002}}.tar", "parquet": f"{d}/pairs.parquet",
          "csv": f"csv:{d}/pairs.csv", "jsonl": f"jsonl:{d}/pairs.jsonl"}


_OPTIONS = {"jsonl": dict(image_column="file", text_column="sentence")}
_IDS = dict(tar=TAR_IDS, **TABLE_IDS)


def _cfg(data, **kw):
  cfg = dict(data=data, split="train", tokenizer=TOKENIZER, text_len=8,
             pp_image="decode|resize(8)|value_range(-1,1)", num_workers=0, prefetch=1,
             shuffle=True)
  cfg.update(kw)
  return cfg


def _ids(tok, batch):
  return [int(t) for t in tok.decode(batch["text"])]


# ---- specs ---------------------------------------------------------------------------

def test_parse_spec_and_files(data):
  assert sources.parse_spec("digits_captions") == ("tfds", "digits_captions")
  assert sources.parse_spec("coco_captions/2017:1.0.*") == ("tfds", "coco_captions/2017:1.0.*")
  assert sources.parse_spec("gs://b/s/{000..009}.tar") == ("tar", "gs://b/s/{000..009}.tar")
  assert sources.parse_spec("csv:/d/x.txt") == ("csv", "/d/x.txt")
  assert sources.parse_spec("/d/x.JSONL")[0] == "jsonl"
  for bad, match in [("/data/shards", "Cannot tell"), ("tar:", "names no path"), ("", "non-empty")]:
    with pytest.raises(sources.SpecError, match=match):
      sources.parse_spec(bad)
  with pytest.raises(sources.SpecError, match="positive"):
    sources.check_data((("digits_captions", 0),))
  assert files.expand_braces("a{08..10}b{x,y}") == ["a08bx", "a08by", "a09bx", "a09by",
                                                    "a10bx", "a10by"]
  shards = [str(data / "shards" / f"{s:05d}.tar") for s in range(3)]
  assert files.expand(f"{data}/shards/*.tar") == shards
  assert files.expand(f"{data}/{{split}}/0000{{0..2}}.tar", split="shards") == shards
  assert files.expand(f"{data}/shards", suffix=".tar") == shards
  assert files.parse_split("train[10:-5%]") == ("train", ("10", "-5%"))
  with pytest.raises(ValueError, match=r"\[start:stop\]"):
    files.parse_split("train[5]")
  with pytest.raises(sources.DatasetNotFound, match=r"00003\.tar.*does not exist"):
    sources.open_source(f"tar:{data}/shards/{{00000..00003}}.tar")


def test_config_validation(data):
  user = config_lib.ConfigDict(dict(total_steps=1))
  user.input = dict(data=(("digits_captions", 0.5), (_specs(data)["tar"], 0.5)))
  user.evals = dict(ret=dict(type="retrieval", data=f"{data}/pairs.parquet"))
  cfg = config_lib.load(user)
  assert sources.mixture_parts(cfg.input.data)[1] == (_specs(data)["tar"], 0.5)
  for data_value, match in [("/no/kind", r"input\.data: Cannot tell"),
                            ((("x", -1.0),), r"input\.data: .*positive")]:
    user.input = dict(data=data_value)
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.load(user)
  user.input = dict(data=_specs(data)["tar"])
  user.evals = dict(ret=dict(type="retrieval"))  # Would evaluate on the training shards.
  with pytest.raises(config_lib.ConfigError, match=r"evals\.ret reads split 'test'.*\{split\}"):
    config_lib.load(user)
  user.evals = dict(ret=dict(type="retrieval", split="train[90%:]"))
  config_lib.load(user)


# ---- sources -------------------------------------------------------------------------

def test_tar_source(data, monkeypatch):
  src = sources.open_source(_specs(data)["tar"], "train")
  assert len(src) == 12
  for i in TAR_IDS:
    ex = src[i]
    assert ex["key"] == f"{i // 4:05d}/{i:09d}" and ex["text"] == str(i)
    assert ex["image"] == _image(i, "PNG" if i % 2 else "JPEG")
  # Caption from another json field; slices; pickling keeps the index.
  alt = sources.open_source(_specs(data)["tar"], image_column="png", text_column="alt")
  assert alt[1]["text"] == "alt 1"
  with pytest.raises(BadRecord, match="no image"):
    alt[0]  # pylint: disable=pointless-statement  No .png for key 0.
  part = sources.open_source(_specs(data)["tar"], "train[3:-25%]")
  assert [part[i]["text"] for i in range(len(part))] == ["3", "4", "5", "6", "7", "8"]
  again = pickle.loads(pickle.dumps(src))
  assert again[5] == src[5]
  # Sidecar indexes replace the header scan.
  shards = files.expand(f"{data}/shards/*.tar")
  written = webdataset.write_sidecars(shards)
  assert written == [s + ".index.json" for s in shards]
  monkeypatch.setattr(webdataset, "_cache", {})
  monkeypatch.setattr(webdataset, "scan_shard", lambda *a: 1 / 0)
  from_sidecar = sources.open_source(_specs(data)["tar"])
  assert [from_sidecar[i] for i in range(12)] == [src[i] for i in range(12)]
  for s in written:
    os.remove(s)


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl"])
def test_table_source(data, kind):
  src = sources.open_source(_specs(data)[kind], "train", **_OPTIONS.get(kind, {}))
  assert len(src) == len(TABLE_IDS[kind])
  for row, i in enumerate(TABLE_IDS[kind]):
    ex = pickle.loads(pickle.dumps(src))[row]  # Workers re-read the table lazily.
    assert ex["text"] == str(i) and ex["image"] == _image(i, "PNG")
  if kind == "jsonl":
    with pytest.raises(ValueError, match=r"found no image column among \['file', 'sentence'\]"):
      sources.open_source(_specs(data)[kind])
    with pytest.raises(ValueError, match=r"no text column 'caption'.*input\.text_column"):
      sources.open_source(_specs(data)[kind], image_column="file", text_column="caption")


def test_missing_field_skipped_and_counted(tmp_path):
  good = [(f"{i}.png", _image(i, "PNG")) for i in range(6)] + [
      (f"{i}.txt", str(i).encode()) for i in range(6)]
  bad = [("6.png", _image(6, "PNG")), ("7.txt", b"7"), ("8.json", b'{"url": "x"}'),
         ("8.jpg", _image(8, "JPEG"))]
  _write_shard(tmp_path / "a.tar", good + bad)
  src = sources.open_source(f"{tmp_path}/a.tar")
  assert len(src) == 9
  for i, what in [(6, "no caption"), (7, "no image"), (8, "no caption")]:
    with pytest.raises(BadRecord, match=what) as e:
      src[i]  # pylint: disable=pointless-statement
    assert e.value.reason == "missing_field"
  tok = tokenizer.Tokenizer(TOKENIZER)
  it = pipeline.make_train_iterator(_cfg(f"{tmp_path}/a.tar"), global_batch_size=6, seed=0,
                                    sharding=None)
  assert sorted(_ids(tok, next(it))) == list(range(6))
  assert it.stats()["skipped/missing_field"] == it.get_state()["grain"]["next_index"] - 6 >= 1


# ---- bad data: decoded captions, malformed lines, one vocabulary of skip reasons -------

def _skip_reasons(spec, n_good, **options) -> set[str]:
  """The skip reasons the train pipeline counts over (at least) one epoch of `spec`."""
  it = pipeline.make_train_iterator(_cfg(spec, **options), global_batch_size=n_good, seed=0,
                                    sharding=None)
  next(it), next(it)  # pylint: disable=expression-not-assigned  2 n_good reads >= 1 epoch.
  return {k.split("/", 1)[1] for k in it.stats() if k.startswith("skipped/")}


def _reason(src, i) -> str:
  with pytest.raises(BadRecord) as e:
    src[i]  # pylint: disable=pointless-statement
  return e.value.reason


def test_table_caption_bytes_are_decoded(tmp_path):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  captions = [b"0", b"\xff\xfe 1", "2 \u00fcn\u00ef".encode(), b"3"]
  pq.write_table(pa.table({
      "jpg": [_image(i, "PNG") for i in range(4)],
      "caption": pa.array(captions, pa.binary()),
      "captions": pa.array([[c, b"x"] for c in captions], pa.list_(pa.binary())),
  }), tmp_path / "b.parquet")
  src = sources.open_source(f"{tmp_path}/b.parquet")
  assert [src[i]["text"] for i in (0, 2, 3)] == ["0", "2 \u00fcn\u00ef", "3"]  # Not "b'0'".
  assert _reason(src, 1) == "bad_caption_encoding"
  several = sources.open_source(f"{tmp_path}/b.parquet", text_column="captions")
  assert preprocess.captions(several[0]["text"]) == ["0", "x"]
  assert _reason(several, 1) == "bad_caption_encoding"
  assert _skip_reasons(f"{tmp_path}/b.parquet", 3) == {"bad_caption_encoding"}


def test_malformed_lines_are_skipped_and_counted(data, tmp_path, caplog):
  img = data / "img"
  lines = [json.dumps({"file": f"{img}/300.png", "sentence": "300"}),
           '{"file": "x.png", "sentence": ',  # Cut short.
           json.dumps({"file": f"{img}/301.png", "sentence": 5}),  # A number: still a caption.
           "",
           "[1, 2]"]  # Not an object.
  (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
  with caplog.at_level("WARNING"):
    src = sources.open_source(f"{tmp_path}/bad.jsonl", image_column="file",
                              text_column="sentence")
  assert len(src) == 4 and [src[0]["text"], src[1]["text"]] == ["300", "5"]
  assert [_reason(src, i) for i in (2, 3)] == ["malformed_record"] * 2
  with pytest.raises(BadRecord, match=r"bad\.jsonl line 5: a JSON list, not an object"):
    src[3]  # pylint: disable=pointless-statement
  assert re.search(rf"{tmp_path}/bad\.jsonl: skipping 2 malformed line.*line 2: .*line 5: ",
                   caplog.text)
  # CSV: a row with a field too many; cells read as written; a caption that is not UTF-8.
  (tmp_path / "bad.csv").write_bytes(b"image_path,text\n" + f"{img}/200.png,007\n".encode()
                                     + f"{img}/201.png,2,01\n".encode()
                                     + f"{img}/202.png,".encode() + b"\xff202\n")
  src = sources.open_source(f"csv:{tmp_path}/bad.csv")
  assert len(src) == 3 and src[0]["text"] == "007"
  assert [_reason(src, i) for i in (1, 2)] == ["bad_caption_encoding", "malformed_record"]
  with pytest.raises(BadRecord, match=r"bad\.csv line 3: 3 fields, the header has 2"):
    src[2]  # pylint: disable=pointless-statement
  # The run goes on and counts them.
  assert _skip_reasons(f"csv:{tmp_path}/bad.csv", 1) == {"malformed_record",
                                                         "bad_caption_encoding"}
  assert _skip_reasons(f"{tmp_path}/bad.jsonl", 2, image_column="file",
                       text_column="sentence") == {"malformed_record"}


def _raised_reasons():
  """(file, regex) of each BadRecord(reason) raised in big_mm/ and tools/: a literal
  reason, or an f-string one with its fields as `.+`; None for any other expression."""
  for path in sorted(glob.glob(f"{ROOT}/big_mm/**/*.py", recursive=True)
                     + glob.glob(f"{ROOT}/tools/*.py")):
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      func = getattr(node, "func", None)
      if getattr(func, "id", getattr(func, "attr", None)) != "BadRecord" or not node.args:
        continue
      arg = node.args[0]
      if isinstance(arg, ast.Constant):
        yield path, re.escape(arg.value)
      elif isinstance(arg, ast.JoinedStr):
        yield path, "".join(re.escape(v.value) if isinstance(v, ast.Constant) else ".+"
                            for v in arg.values)
      else:
        yield path, None


def test_one_vocabulary_of_skip_reasons(tmp_path, coco_dir):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  vocabulary = set(sources.SKIP_REASONS)
  raised = list(_raised_reasons())
  assert len(raised) > 20
  for path, pattern in raised:
    assert pattern and any(re.fullmatch(pattern, r) for r in vocabulary), (path, pattern)
  with open(f"{ROOT}/big_mm/input/pipeline.py", encoding="utf-8") as f:
    counted = set(re.findall(r'(?:_SKIP: |_skipped\[)"(\w+)"', f.read()))
  assert counted and counted <= vocabulary
  with open(f"{ROOT}/README.md", encoding="utf-8") as f:
    readme = f.read()
  assert not [r for r in vocabulary if f"`{r}`" not in readme]
  # The same bad captions get the same reason from every source.
  bad = [b"\xff\xfe not UTF-8", b"  ", b"3"]
  _write_shard(tmp_path / "a.tar", [(f"{i}.png", _image(i, "PNG")) for i in range(4)]
               + [(f"{i}.txt", c) for i, c in enumerate(bad)] + [("3.json", b'{"caption": ')])
  tar = sources.open_source(f"{tmp_path}/a.tar")
  assert [_reason(tar, i) for i in (0, 1, 3)] == ["bad_caption_encoding", "empty_caption",
                                                  "malformed_record"]
  pq.write_table(pa.table({"jpg": [_image(i, "PNG") for i in range(3)],
                           "caption": pa.array(bad, pa.binary())}), tmp_path / "a.parquet")
  table = sources.open_source(f"{tmp_path}/a.parquet")
  assert [_reason(table, i) for i in (0, 1)] == ["bad_caption_encoding", "empty_caption"]
  assert _skip_reasons(f"{tmp_path}/a.tar", 1) == _skip_reasons(f"{tmp_path}/a.parquet", 1) | {
      "malformed_record"}
  tfds_src = sources.open_source("coco_captions", "test", coco_dir, text_column="captions/text")
  record = dict(tfds_src._ds[0])  # pylint: disable=protected-access
  record["captions"] = {"text": np.array([b"ok", bad[0]], object), "id": np.arange(2)}
  record["image/filename"] = bad[0]  # Not the caption: kept as bytes.
  tfds_src._ds = [record]  # pylint: disable=protected-access
  assert _reason(tfds_src, 0) == "bad_caption_encoding"
  record["captions"]["text"] = np.array([b"ok"], object)
  assert tfds_src[0]["text"] == ["ok"] and tfds_src[0]["image/filename"] == bad[0]
  # make_tokenizer skips and counts them alike.
  from tools import make_tokenizer  # pylint: disable=g-import-not-at-top
  skipped = collections.Counter()
  assert make_tokenizer.texts_from_data(f"{tmp_path}/a.tar", skipped=skipped) == ["3"]
  assert skipped == {"bad_caption_encoding": 1, "empty_caption": 1, "malformed_record": 1}


# ---- through the pipeline ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tar", "parquet", "csv", "jsonl"])
def test_pipeline_processes_and_resume(data, kind):
  tok = tokenizer.Tokenizer(TOKENIZER)
  cfg = _cfg(_specs(data)[kind], **_OPTIONS.get(kind, {}))
  n = len(_IDS[kind])
  # Two simulated processes, global batch 2: n steps read two epochs.
  seen = []
  for p in range(2):
    it = pipeline.make_train_iterator(cfg, global_batch_size=2, seed=1, sharding=None,
                                      process_index=p, process_count=2)
    seen.append([_ids(tok, next(it))[0] for _ in range(n)])
  stream = [x for pair in zip(seen[0], seen[1]) for x in pair]  # The global stream.
  for epoch in range(2):
    assert sorted(stream[epoch * n:(epoch + 1) * n]) == sorted(_IDS[kind])
  # Exact resume mid-epoch.
  it = pipeline.make_train_iterator(cfg, global_batch_size=2, seed=0, sharding=None)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(n)]
  it2 = pipeline.make_train_iterator(cfg, global_batch_size=2, seed=0, sharding=None)
  it2.set_state(state)
  for w in want:
    got = next(it2)
    assert (got["image"] == w["image"]).all() and (got["text"] == w["text"]).all()


def test_pipeline_worker_processes(data):
  """grain worker processes unpickle the sources (tables re-read lazily) and read the
  same batches as in-process."""
  cfg = _cfg(((_specs(data)["tar"], 1.0), (_specs(data)["parquet"], 1.0)))
  its = [pipeline.make_train_iterator(dict(cfg, num_workers=w), global_batch_size=4, seed=0,
                                      sharding=None) for w in (0, 1)]
  try:
    for _ in range(3):
      x, y = next(its[0]), next(its[1])
      assert (x["image"] == y["image"]).all() and (x["text"] == y["text"]).all()
  finally:
    for it in its:
      it.close()


def test_mixture(data):
  assert mixture.slots([10, 3], [0.5, 0.5]) == [10, 10]
  assert mixture.slots([3, 10], [0.3, 0.7]) == [4, 10]  # L = ceil(10 / 0.7) = 15.
  assert mixture.slots([4, 4], [1, 3]) == [4, 12]
  specs = _specs(data)
  src = sources.open_source(((specs["tar"], 3.0), (specs["parquet"], 1.0)), "train")
  assert (src.sizes, src.slots, len(src)) == ([12, 6], [18, 6], 24)  # 18 / 24 = 3 / 4.
  src = sources.open_source(((specs["tar"], 1.0), (specs["parquet"], 1.0)), "train")
  assert (src.slots, len(src)) == ([12, 12], 24)
  texts = [src[i]["text"] for i in range(24)]
  assert texts == [str(i) for i in TAR_IDS] + [str(i) for i in TABLE_IDS["parquet"]] * 2
  # Through the pipeline: a virtual epoch holds every example, in the weights' proportion;
  # deterministic and exactly resumable.
  tok = tokenizer.Tokenizer(TOKENIZER)
  cfg = _cfg(((specs["tar"], 1.0), (specs["parquet"], 1.0)))

  def read(state=None, steps=6):
    it = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=2, sharding=None)
    if state:
      it.set_state(state)
    return it, sum((_ids(tok, next(it)) for _ in range(steps)), [])

  it, epoch = read()
  assert sorted(epoch) == sorted(TAR_IDS + TABLE_IDS["parquet"] * 2)
  assert read()[1] == epoch
  state = json.loads(json.dumps(it.get_state()))
  assert read(state, 3)[1] == read(None, 9)[1][24:]


# ---- TFDS nested caption fields (coco_captions' layout) ------------------------------

# Fake coco_captions/2014 test split: image i shows grey (40 * i) and has these captions
# (numerals, which the digits tokenizer gives back exactly); image 2 has 6, as a few COCO
# images do.
COCO_CAPTIONS = [[f"{10 * i + j}" for j in range(6 if i == 2 else 5)] for i in range(4)]


def build_coco_captions(data_dir) -> None:
  """A tiny prepared `coco_captions` laid out like TFDS's (config 2014, version 1.1.0,
  array_record): image, image/filename, image/id, captions {id, text}. Its builder is not
  registered, so big_mm reads it as a user without TensorFlow does: from its files (the
  catalog's coco_captions builder imports TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  def jpeg(i):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()

  with tfds.core.registered.skip_registration():
    class CocoCaptions(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      VERSION = tfds.core.Version("1.1.0")
      BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

      @tfds.core.utils.classproperty
      @classmethod
      def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "captions": tfds.features.Sequence({"text": tfds.features.Text(),
                                                "id": np.int64}),
        }))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"test": self._generate_examples()}

      def _generate_examples(self):
        for i, caps in enumerate(COCO_CAPTIONS):
          yield i, {"image": jpeg(i), "image/filename": f"{i}.jpg", "image/id": i,
                    "captions": {"text": caps, "id": [10 * i + j for j in range(len(caps))]}}

  CocoCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("coco")
  build_coco_captions(d)
  return str(d)


def test_tfds_nested_caption_field(coco_dir):
  src = sources.open_source("coco_captions", "test", coco_dir, text_column="captions/text")
  assert len(src) == 4
  by_id = {int(src[r]["image/id"]): src[r] for r in range(4)}
  for i, caps in enumerate(COCO_CAPTIONS):
    assert by_id[i]["text"] == caps  # Every caption, as str.
  again = pickle.loads(pickle.dumps(src))
  assert again[1]["text"] == src[1]["text"]
  # A top-level feature whose name holds "/" still works.
  assert sources.open_source("coco_captions", "test", coco_dir,
                             text_column="image/filename")[0]["text"].endswith(".jpg")
  with pytest.raises(ValueError, match=r"no feature 'captions/txt'.*'captions/text'"):
    sources.open_source("coco_captions", "test", coco_dir, text_column="captions/txt")
  with pytest.raises(ValueError, match=r"image_column 'captions' .* \['image'\]"):
    sources.open_source("coco_captions", "test", coco_dir, image_column="captions")
  assert "tensorflow" not in sys.modules


def test_unknown_tfds_name_or_split_suggests_prepared_ones(coco_dir):
  assert sources.prepared_datasets(coco_dir) == {"coco_captions/2014": ["1.1.0"]}
  with pytest.raises(sources.DatasetNotFound,
                     match=r"Did you mean 'coco_captions/2014' \(prepared there\)\?"):
    sources.open_source("coco_caption/2014", "test", coco_dir)
  with pytest.raises(sources.DatasetNotFound,
                     match=r"Prepared versions of 'coco_captions/2014': \['1\.1\.0'\]"):
    sources.open_source("coco_captions/2014:1.0.0", "test", coco_dir)
  with pytest.raises(ValueError, match=r"Bad split 'tset\[:10%\]'.*Did you mean 'test'\?"):
    sources.open_source("coco_captions/2014", "tset[:10%]", coco_dir)


def test_make_tokenizer_reads_any_input_data(data, coco_dir, tmp_path, capsys):
  from tools import make_tokenizer  # pylint: disable=g-import-not-at-top
  specs = _specs(data)
  # A mixture is read over its virtual epoch (parquet twice), so its weights hold.
  mix = ((specs["tar"], 1.0), (specs["parquet"], 1.0))
  assert sorted(make_tokenizer.texts_from_data(mix)) == sorted(
      str(i) for i in TAR_IDS + TABLE_IDS["parquet"] * 2)
  assert make_tokenizer.texts_from_data(specs["jsonl"], **_OPTIONS["jsonl"]) == [
      str(i) for i in TABLE_IDS["jsonl"]]
  coco = make_tokenizer.texts_from_data("coco_captions", "test", coco_dir,
                                        text_column="captions/text")
  assert sorted(coco) == sorted(sum(COCO_CAPTIONS, []))  # Every caption of each image.
  some = make_tokenizer.texts_from_data(specs["tar"], max_records=5)
  assert len(set(some)) == 5 and some == make_tokenizer.texts_from_data(specs["tar"],
                                                                          max_records=5)
  out = tmp_path / "mix.model"
  assert make_tokenizer.main(["--data", repr(mix), "--out", str(out), "--vocab_size", "24",
                              "--model_type", "bpe"]) == 0
  tok = tokenizer.Tokenizer(str(out))
  assert tok.decode(tok.encode(["104", "11"], 8)) == ["104", "11"]
  with pytest.raises(SystemExit):
    make_tokenizer.main(["--data", "coco_caption", "--data_dir", coco_dir, "--out", str(out)])
  assert "Did you mean 'coco_captions/2014'" in capsys.readouterr().err


def test_eval_batches_hold_every_caption(coco_dir):
  """captions=5: text [B, 5, L], each image's first 5 captions in order (the 6th of image 2
  dropped, as the standard protocol does)."""
  tok = tokenizer.Tokenizer(TOKENIZER)
  cfg = _cfg("coco_captions", data_dir=coco_dir, text_column="captions/text")
  batches = list(pipeline.make_eval_batches(cfg, "test", 8, None, captions=5))
  assert len(batches) == 1 and batches[0]["text"].shape == (8, 5, 8)
  batch = batches[0]
  real = batch["mask"] > 0
  assert real.sum() == 4
  got = [tok.decode(rows) for rows in batch["text"][real]]
  images = np.round((batch["image"][real, 0, 0, 0] + 1) * 127.5 / 40).astype(int)
  assert sorted(images) == [0, 1, 2, 3]
  for i, caps in zip(images, got):
    assert caps == COCO_CAPTIONS[i][:5]
  # The default: one caption (the first) per example, as training reads it.
  first = next(iter(pipeline.make_eval_batches(cfg, "test", 8, None)))
  assert first["text"].shape == (8, 8)
  assert [tok.decode(first["text"][r:r + 1])[0] for r in np.flatnonzero(real)] == [
      COCO_CAPTIONS[i][0] for i in images]


# ---- converter -----------------------------------------------------------------------

def test_convert_opens_by_name(data, tmp_path):
  from data import convert  # pylint: disable=g-import-not-at-top
  specs = _specs(data)
  argv = ["--input", specs["tar"], "--input", f"test={specs['parquet']}",
          "--name", "my_pairs", "--data_dir", str(tmp_path)]
  assert convert.main(argv) == 0
  for split, kind in [("train", "tar"), ("test", "parquet")]:
    want = sources.open_source(specs[kind])
    got = sources.open_source("my_pairs", split, str(tmp_path))
    assert len(got) == len(want)
    for i in range(len(want)):
      assert {k: got[i][k] for k in ("image", "text", "key")} == want[i]
  assert sources.num_examples("my_pairs", "test[:50%]", str(tmp_path)) == 3
  assert "tensorflow" not in sys.modules
