"""Pieces shared by recipes: paper-scale evaluators (ImageNet zero-shot / COCO retrieval), and
the digits demos' training input and evaluators on the bundled digits."""


def paper_evals(pp_image: str, *, every_steps: int):
  """Zero-shot ImageNet and COCO retrieval, as the papers report them.

  ImageNet: TFDS imagenet2012 `validation` (50,000 images; preparing it needs the ILSVRC2012
  tars from image-net.org, see big_mm.input.sources.BUILD_COMMANDS), CLIP's curated class
  names and its 80 prompt templates (big_mm/evaluators/imagenet.py). Checked at start-up: if
  it is not prepared the run stops, saying how to prepare it
  (--config.evals.zeroshot_imagenet.every_steps=0 turns the evaluator off).
  COCO: TFDS coco_captions (Karpathy splits), the 5,000-image `test` split that published
  R@1 numbers use, 5 captions per image (the standard protocol; retrieval.py).
  """
  return dict(
      zeroshot_imagenet=dict(type="zeroshot", data="imagenet2012", split="validation",
                             every_steps=every_steps, pp_image=pp_image,
                             classnames="imagenet2012", templates="clip80"),
      retrieval_coco=dict(type="retrieval", data="coco_captions", split="test",
                          text_column="captions/text", captions_per_image=5,
                          every_steps=every_steps, pp_image=pp_image),
  )


DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EVAL_PP = "decode|resize(32)|value_range(-1,1)"
# Captions name a digit as a word or a numeral: either counts for label_accuracy.
CAPTION_CLASSES = tuple((word, str(i)) for i, word in enumerate(DIGITS))
# Zero-shot and scoring prompts: data/digits_captions.py's HELD_OUT_TEMPLATES, which no
# caption uses (so the model never trained on these phrasings).
HELD_OUT_PROMPTS = ("a photo of the number {}", "the digit {}", "a scan of a handwritten {}")


def digits_train_input() -> dict:
  """The digits demos' training input (configs/demo.py, demo_cappa.py, demo_coca.py)."""
  return dict(
      data="digits_captions", split="train", data_dir=None, tokenizer="data/digits_spm.model",
      text_len=16, pp_image="decode|resize(36)|random_crop(32)|value_range(-1,1)",
      num_workers=0)


def digits_zeroshot_eval(every_steps: int) -> dict:
  """Zero-shot digit classification with the held-out prompts."""
  return dict(type="zeroshot", split="test", every_steps=every_steps, pp_image=EVAL_PP,
              classnames=DIGITS, templates=HELD_OUT_PROMPTS)


def digits_caption_evals(every_steps: int) -> dict:
  """Held-out captioning metrics (greedy decoding) and CapPa's scoring classifier."""
  return dict(
      captioning=dict(type="captioning", split="test", every_steps=every_steps,
                      pp_image=EVAL_PP, classnames=CAPTION_CLASSES, max_examples=300),
      scoring=dict(type="scoring", split="test", every_steps=every_steps, pp_image=EVAL_PP,
                   classnames=DIGITS, templates=HELD_OUT_PROMPTS),
  )
