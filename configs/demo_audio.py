r"""Demo: audio-text-image binding on the tri-modal digits (N-modal binding, LanguageBind /
ImageBind style, and Symile / GRAM).

Data (`python data/build_demo.py --binding`, Debian packages espeak-ng and klettres-data):
  digits_captions  (image, text): the bundled 8x8 digits at 32x32 with captions.
  spoken_digits    (audio, text): digits and letters a..z spoken by espeak-ng (many voices,
                   speeds, pitches), captions such as "a voice saying seven", "the letter b".
  digits_speech    (image, audio, text): each digit image with the digit spoken.
  klettres_speech  letters_en: 52 real human recordings of the English letters (KLettres).

Setups (`data=`):
  emergent  (default) LanguageBind's claim: train on (image, text) from digits_captions and
            (audio, text) from spoken_digits only (a 1:1 mixture; a batch mixes both, the
            missing modality masked out of every loss), pairs (image, text) and (audio, text).
            Audio and image never meet, yet audio<->image retrieval on digits_speech's test
            split is measured (class_R@1: the top candidate shows / says the same digit;
            chance 0.1). From scratch, the three towers train jointly. With `init=WORKDIR` (a
            finished `data=image_text` run) it is LanguageBind's recipe: the image and text
            towers start from that run and the text tower is frozen, so the audio tower is
            bound to a language space that image-text training already made.
  image_text  (image, text) pairs of digits_captions only: the first stage of that recipe.
  trimodal  digits_speech's train split (all three modalities on every record), the same
            budget, objective=pairwise (the three pairs), symile or gram: the two-to-one
            retrievals (image+text -> audio, audio+text -> image, image+audio -> text).
Every run evaluates (at the end) audio<->image, audio<->text and image<->text retrieval on
digits_speech test, zero-shot digits from audio and from images (the held-out prompts), and
zero-shot letters from the real recordings of klettres_speech letters_en (26 classes,
"the letter {}"; chance 1/26), which espeak-ng did not make.

Audio: 16 kHz, a 1.6 s window (random in training, central in evaluation; clips are
0.4-1.7 s, shorter ones zero-padded), log-mel 160 frames x 32 bins computed in the input
pipeline (big_mm/input/audio.py) and normalised by the training data's statistics,
SpecAugment in training; an AST-style audio transformer on
16x8 spectrogram patches (10 x 4 = 40 tokens).

Commands (from the repo root; a few minutes each on 2 CPU cores):

  python -m big_mm.train --config configs/demo_audio.py --workdir /tmp/bind_emergent
  python -m big_mm.train --config configs/demo_audio.py:data=image_text --workdir /tmp/bind_it
  python -m big_mm.train --config configs/demo_audio.py:init=/tmp/bind_it --workdir /tmp/bind_lb
  python -m big_mm.train --config configs/demo_audio.py:data=trimodal --workdir /tmp/bind_pairs
  python -m big_mm.train --config configs/demo_audio.py:data=trimodal,objective=symile \
      --workdir /tmp/bind_symile
  python -m big_mm.train --config configs/demo_audio.py:data=trimodal,objective=gram \
      --workdir /tmp/bind_gram

README.md and docs/benchmarks.md give the measured metrics.

Arguments: data (emergent|image_text|trimodal), objective (pairwise|symile|gram), loss
(sigmoid|softmax), init (a data=image_text run's workdir: LanguageBind), steps, batch.
"""
from big_mm import config as config_lib
from configs import common

TOKENIZER = "data/digits_speech_spm.model"
MODALITIES = ("image", "audio", "text")
# log-mel statistics of spoken_digits / digits_speech train (300 random 1.6 s windows each:
# mean -9.6 / -9.1, std 6.2 / 6.3; half the bins are silence or padding at log(1e-6) = -13.8).
NORMALIZE = "normalize_audio(-9.4, 6.3)"
AUDIO_TRAIN = ("decode_audio(16000, 10)|random_crop_audio(1.6)|gain(-6, 6)|log_mel(160, 32)|"
               f"{NORMALIZE}|spec_augment(1, 4, 1, 16)")
AUDIO_EVAL = f"decode_audio(16000, 10)|central_crop_audio(1.6)|log_mel(160, 32)|{NORMALIZE}"
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")


def binding_evals() -> dict:
  """Retrieval between every pair, zero-shot from audio and images, the klettres letters, and
  the two-to-one retrievals, on the held-out splits (at the end of the run)."""
  test = dict(data="digits_speech", split="test", pp_image=common.EVAL_PP,
              pp_modalities={"audio": AUDIO_EVAL})
  evals = {f"retrieval_{a}_{b}": dict(test, type="retrieval", modalities=(a, b))
           for a, b in (("audio", "image"), ("audio", "text"), ("image", "text"))}
  evals["zeroshot_audio"] = dict(test, type="zeroshot", modality="audio",
                                 classnames=common.DIGITS, templates=common.HELD_OUT_PROMPTS)
  evals["zeroshot_image"] = dict(test, type="zeroshot", modality="image",
                                 classnames=common.DIGITS, templates=common.HELD_OUT_PROMPTS)
  evals["zeroshot_letters"] = dict(type="zeroshot", data="klettres_speech", split="letters_en",
                                   modality="audio", pp_modalities={"audio": AUDIO_EVAL},
                                   classnames=LETTERS, templates=("the letter {}",))
  for query, target in ((("image", "text"), "audio"), (("audio", "text"), "image"),
                        (("image", "audio"), "text")):
    evals[f"to_{target}"] = dict(test, type="higher_order_retrieval", query=query,
                                 target=target, ks=(1, 5))
  return evals


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="emergent", objective="pairwise", loss="sigmoid",
                             init="", steps=600, batch=128)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_steps = arg.steps
  c.log_every_steps = 50

  data = {"emergent": (("digits_captions", 1.0), ("spoken_digits", 1.0)),
          "image_text": "digits_captions", "trimodal": "digits_speech"}[arg.data]
  c.input = dict(common.digits_train_input(), data=data, tokenizer=TOKENIZER, text_len=16)
  if arg.data != "image_text":  # image_text: no audio at all, an image-text model.
    c.input.update(modalities=MODALITIES, pp_modalities={"audio": AUDIO_TRAIN})

  c.model_name = "towers"
  c.model = dict(
      towers=dict(
          image=dict(width=64, depth=2, mlp_dim=256, num_heads=4, patch_size=(4, 4),
                     posemb="learn", pool="map"),
          audio=dict(width=64, depth=2, mlp_dim=256, num_heads=4, patch_size=(16, 8),
                     posemb="learn", pool="map"),
          text=dict(width=64, depth=2, mlp_dim=256, num_heads=4, vocab_size=192,
                    pool="last_position"),
      ),
      out_dim=64, temperature_init=10.0,
      bias_init=-10.0 if arg.loss == "sigmoid" else None)
  if arg.data == "image_text":
    del c.model.towers["audio"]

  if arg.data == "emergent":
    pairs = (("image", "text", 1.0), ("audio", "text", 1.0))
  elif arg.data == "image_text":
    pairs = (("image", "text", 1.0),)
  else:
    pairs = (("image", "text", 1.0), ("audio", "text", 1.0), ("audio", "image", 1.0))
  c.objective = dict(name="binding", loss=arg.loss, strategy="all_gather")
  if arg.objective == "pairwise":
    c.objective.pairs = pairs
  else:
    c.objective.update(pairs=(), higher_order=arg.objective, higher_order_modalities=MODALITIES)

  c.optim = dict(name="adamw", lr=3e-3, b1=0.9, b2=0.95, wd=1e-4, clip_norm=1.0,
                 schedule=dict(name="cosine", warmup_steps=min(50, arg.steps // 10)))
  if arg.init:  # LanguageBind: image and text towers (and t, b) from the run, text frozen.
    c.init = dict(workdir=arg.init, include=r"(img|txt)/.*|t|b")
    c.optim.lr_mults = ((r"txt/.*", 0.0), (r".*", 1.0))
  c.evals = binding_evals()
  if arg.data == "image_text":
    c.evals = {k: v for k, v in c.evals.items() if k in ("zeroshot_image", "retrieval_image_text")}
  c.checkpoint = dict(every_steps=200, keep=2)
  return c
