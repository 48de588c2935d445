r"""mSigLIP B/16 at 256 px: multilingual SigLIP (arXiv 2303.15343, "i18n") on multilingual data.

  python -m big_mm.train --config configs/msiglip_b16.py:data=my_multilingual_dataset \
      --workdir gs://bucket/msiglip_b16

configs/siglip_b16.py at 256 px with the multilingual tokenizer the SigLIP paper's i18n models
use: the 250k-piece mC4 SentencePiece vocabulary of mT5 (big_vision's "mc4"; fetch it with
`gsutil cp gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model mc4_250k.model`), so
the text tower's embedding holds 250k x 768 params. WebLI was used without a language filter
(the HF card of google/siglip-base-patch16-256-multilingual): records carry their language in
input.language_column ("language"), and `temperature` (input.language_temperature) reshapes
the language mix as mT5 does (T ~ 3.3); the default None keeps the data's natural mix, as
mSigLIP did. Intended hardware: TPU v4-32 or larger / 16+ H100s (global batch 32k; the
250k-row embedding is sharded over `tensor` with `mesh_tensor`).

Target (open_clip's evaluation of the released ViT-B-16-SigLIP-i18n-256, docs/
openclip_results.csv and openclip_multilingual_retrieval_results.csv, open_clip commit
89fb801): Crossmodal-3600 (36 languages) recall@1 averaged over the languages, image->text
48.9%, text->image 44.1% (the English-only ViT-B-16-SigLIP-256: 18.2% / 16.7%); ImageNet
zero-shot (English prompts) 60.7%, against 76.0% for the English model at 224 px: a
multilingual vocabulary and data cost English accuracy at this size. Crossmodal-3600 is not a
TFDS dataset here: prepare it as a table or TFDS split with text_<lang> caption columns for
the per-language retrieval evaluator (`languages`, big_mm/evaluators/retrieval.py).
Arguments: data, batch, examples, temperature, mesh_tensor.
"""
from big_mm import config as config_lib
from configs import siglip_b16


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="webli_tfds", batch=32_768, examples=9_000_000_000,
                             temperature=None, mesh_tensor=1)
  c = siglip_b16.get_config(f"data={arg.data},batch={arg.batch},examples={arg.examples},res=256")
  c.input.tokenizer = "mc4_250k.model"
  c.input.language_column = "language"
  c.input.language_temperature = None if arg.temperature is None else float(arg.temperature)
  c.model.towers.text.vocab_size = 250_000
  c.mesh = dict(data=-1, fsdp=1, tensor=arg.mesh_tensor)
  return c
