"""input.tokenizer: a missing paper-recipe tokenizer stops the run at start-up saying where the
published model is; a Hugging Face tokenizer directory holding a SentencePiece model works."""
import io
import os

import numpy as np
import pytest
import sentencepiece as spm

from big_mm import config as config_lib
from big_mm import train
from big_mm.input import tokenizer
from conftest import ROOT, TOKENIZER, tiny_config

C4_EN = "gs://t5-data/vocabs/cc_en.32000/sentencepiece.model"


@pytest.mark.parametrize("recipe,published", [
    ("siglip_b16", C4_EN), ("lit_b16", C4_EN), ("coca_b16", C4_EN), ("cappa_b16", C4_EN),
    ("clip_b16", None),  # CLIP's BPE is not SentencePiece: nothing published to point at
])
def test_a_missing_paper_tokenizer_stops_the_build(recipe, published, tmp_path, monkeypatch):
  """train.build (before any compute: no params exist yet) names the file, where the published
  model lives (or the published ones) and how to train one."""
  monkeypatch.chdir(tmp_path)  # the recipes name the tokenizer relative to the working dir
  config = config_lib.load(os.path.join(ROOT, "configs", f"{recipe}.py"))
  with pytest.raises(FileNotFoundError) as e:
    train.build(config)
  message = str(e.value)
  assert f"Tokenizer model not found: {config.input.tokenizer!r}" in message
  assert "python tools/make_tokenizer.py --data DATA --vocab_size N --out PATH.model" in message
  if published:
    assert f"gsutil cp {published} {config.input.tokenizer}" in message
    assert published.replace("gs://", "https://storage.googleapis.com/") in message
  else:
    assert C4_EN in message and "Hugging Face tokenizer directory" in message


def test_a_hugging_face_tokenizer_directory_is_accepted(data_dir, tmp_path):
  """transformers' SiglipTokenizer.save_pretrained writes spiece.model + tokenizer_config.json:
  that directory as input.tokenizer encodes as the .model file itself."""
  transformers = pytest.importorskip("transformers")
  hf_dir = str(tmp_path / "siglip_tokenizer")
  transformers.SiglipTokenizer(vocab_file=TOKENIZER).save_pretrained(hf_dir)
  texts = ["a photo of the number seven", "handwritten 7"]
  from_dir = tokenizer.Tokenizer(hf_dir)
  assert from_dir.path == os.path.join(hf_dir, "spiece.model")
  np.testing.assert_array_equal(from_dir.encode(texts, 16),
                                tokenizer.Tokenizer(TOKENIZER).encode(texts, 16))
  setup = train.build(tiny_config(data_dir, **{"input.tokenizer": hf_dir}))
  assert setup.tokenizer.path == os.path.join(hf_dir, "spiece.model")


def test_a_directory_without_sentencepiece_model_is_refused(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"holds no SentencePiece model \(looked for "
                     r"spiece.model, tokenizer.model.*tokenizer.json alone is a Hugging Face "
                     r"fast tokenizer"):
    tokenizer.Tokenizer(str(tmp_path))


def test_a_model_whose_pad_id_is_not_0_is_refused(tmp_path):
  """The models treat token 0 as padding: e.g. a LLaMA-style model (no pad) cannot be used."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["a photo of a cat", "a photo of a dog"] * 20), model_writer=model,
      vocab_size=20, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      minloglevel=2)
  path = tmp_path / "tokenizer.model"
  path.write_bytes(model.getvalue())
  with pytest.raises(config_lib.ConfigError, match=r"needs pad id 0 .* it has pad=-1, eos=2"):
    tokenizer.Tokenizer(str(tmp_path))
