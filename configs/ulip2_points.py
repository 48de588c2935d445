r"""ULIP-2 (Xue et al., CVPR 2024, arXiv 2305.08275): a Point-BERT encoder bound to frozen
image and text towers, zero-shot 3D classification on ModelNet40.

  python -m big_mm.train --config configs/ulip2_points.py:data=ulip2_triplets,\
towers=/path/to/siglip-so400m-patch14-384,eval_data=modelnet40_points --workdir gs://bucket/ulip2

Facts from salesforce/ULIP@f194ddb:
- Model (models/ULIP_models.py ULIP2_PointBERT_Colored; models/pointbert/
  ULIP_2_PointBERT_10k_colored_pointclouds.yaml): Point-BERT, width 384, depth 18, 6 heads,
  512 groups of 32 points, drop path 0.1, on 10,000 points per shape, projected into the space
  of a frozen open_clip ViT-bigG-14 (laion2b_s39b_b160k) image and text model; logit scale
  initialised to 1/0.07 and learned.
- Loss (models/losses.py ULIPWithImageLoss): softmax contrastive points-text plus points-image,
  both directions, over the all-gathered batch.
- Optimizer (main.py defaults; scripts/pretrain_*.sh change only lr and npoints): AdamW lr 3e-3,
  betas (0.9, 0.98), eps 1e-8, wd 0.1, batch 64 per GPU on 8 A100s (README: "We pre-train ULIP
  on 8 Nvidia A100 GPUs"), 250 epochs, 1 warmup epoch, cosine to 1e-5.
- Training pp (data/dataset_3d.py, the ShapeNet triplets): random subset, pc_norm, random point
  dropout, scale (0.8, 1.25), shift 0.1, small rotation perturbation, random rotation about
  the up axis (y there).
- Zero-shot: ModelNet40's 40 class names (data/labels.json) and 64 prompt templates
  (data/templates.json "modelnet40_64"), prompt embeddings averaged.
Expected result (README, ULIP2-PointBERT-10kxyzrgb-ensembled-objaverse-shapenet): ModelNet40
zero-shot top-1 84.7, top-5 97.1; Objaverse-LVIS top-1 50.6, top-5 79.1 (ULIP-1 Point-BERT on
ShapeNet, 8k points: ModelNet40 top-1 60.3).

Differences here (the published numbers are a target, not a promise):
- Frozen towers: an HF SigLIP directory (`towers=`, default So400m/14 at 384 px; its
  spiece.model is the tokenizer) copied by config.init.path and frozen by optim.lr_mults 0.
  ULIP-2's open_clip ViT-bigG-14 uses OpenAI's byte-level BPE tokenizer, which big_mm cannot
  read. The towers' kwargs below are what big_mm.export.import_hf gives for that model.
- Points are xyz only (ULIP-2's best model reads xyz + rgb); no drop path (the tower has none);
  Point-BERT's feature (its cls token concatenated with the max over patches) is the cls token
  here; pp has no point dropout, shift or rotation perturbation ops (random subset, pc_norm,
  scale, rotation about z: store the clouds z-up).
- Data (`data=`): the user's triplets (ULIP-Objaverse + ULIP-ShapeNet, the SFXX/ulip Hugging
  Face dataset, converted to a TFDS / array_record / parquet source with fields "points"
  (float [n >= 10,000, 3+] or .npy bytes), "image" (encoded), "text"). `eval_data=`: ModelNet40
  as points + label (test split, the 40 classes in the order below).
Hardware: 8 A100 / H100 (bf16; the frozen towers run forward only) or a TPU v4-16.
Arguments: data, eval_data, towers (HF SigLIP directory), batch, epochs.
"""
from big_mm import config as config_lib

# salesforce/ULIP@f194ddb data/labels.json "modelnet40".
MODELNET40 = (
    "airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone",
    "cup", "curtain", "desk", "door", "dresser", "flower pot", "glass box", "guitar", "keyboard",
    "lamp", "laptop", "mantel", "monitor", "night stand", "person", "piano", "plant", "radio",
    "range hood", "sink", "sofa", "stairs", "stool", "table", "tent", "toilet", "tv stand",
    "vase", "wardrobe", "xbox")
# salesforce/ULIP@f194ddb data/templates.json "modelnet40_64".
TEMPLATES = (
    "a point cloud model of {}.", "There is a {} in the scene.", "There is the {} in the scene.",
    "a photo of a {} in the scene.", "a photo of the {} in the scene.",
    "a photo of one {} in the scene.", "itap of a {}.", "itap of my {}.", "itap of the {}.",
    "a photo of a {}.", "a photo of my {}.", "a photo of the {}.", "a photo of one {}.",
    "a photo of many {}.", "a good photo of a {}.", "a good photo of the {}.",
    "a bad photo of a {}.", "a bad photo of the {}.", "a photo of a nice {}.",
    "a photo of the nice {}.", "a photo of a cool {}.", "a photo of the cool {}.",
    "a photo of a weird {}.", "a photo of the weird {}.", "a photo of a small {}.",
    "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of a clean {}.", "a photo of the clean {}.", "a photo of a dirty {}.",
    "a photo of the dirty {}.", "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of a {}.", "a dark photo of the {}.", "a photo of a hard to see {}.",
    "a photo of the hard to see {}.", "a low resolution photo of a {}.",
    "a low resolution photo of the {}.", "a cropped photo of a {}.", "a cropped photo of the {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.", "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of a {}.", "a blurry photo of the {}.",
    "a pixelated photo of a {}.", "a pixelated photo of the {}.",
    "a black and white photo of the {}.", "a black and white photo of a {}", "a plastic {}.",
    "the plastic {}.", "a toy {}.", "the toy {}.", "a plushie {}.", "the plushie {}.",
    "a cartoon {}.", "the cartoon {}.", "an embroidered {}.", "the embroidered {}.",
    "a painting of the {}.", "a painting of a {}.")
NUM_POINTS = 10_000
FROZEN = r"(img|txt)/.*"


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="ulip2_triplets", eval_data="modelnet40_points",
                             towers="siglip-so400m-patch14-384", batch=512, epochs=250)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_epochs = arg.epochs
  c.log_every_steps = 100

  pp_image = "decode|resize(384)|value_range(-1,1)"
  c.input = dict(
      data=arg.data, split="train", modalities=("points", "image", "text"),
      pp_modalities={"points": f"sample_points({NUM_POINTS})|normalize_points|"
                               "random_scale_points(0.8, 1.25)|random_rotate_points('z')"},
      pp_image=pp_image, tokenizer=arg.towers, text_len=64, num_workers=16)

  so400m = dict(width=1152, depth=27, mlp_dim=4304, num_heads=16, act="gelu_tanh",
                norm_eps=1e-6, scan=True, remat_policy="nothing_saveable", dtype="bfloat16")
  c.model_name = "towers"
  c.model = dict(
      towers=dict(
          points=dict(width=384, depth=18, num_heads=6, num_groups=512, group_size=32,
                      pool="tok", dtype="bfloat16"),
          image=dict(so400m, patch_size=(14, 14), posemb="learn", pool="map"),
          text=dict(so400m, vocab_size=32_000, pool="last_position"),
      ),
      out_dim=dict(points=1152, image=0, text=1152),  # SigLIP's: no image head, text 1152
      temperature_init=1 / 0.07,
      bias_init=None,
  )
  c.objective = dict(name="binding", loss="softmax", strategy="all_gather",
                     pairs=(("points", "text", 1.0), ("points", "image", 1.0)))
  c.init = dict(path=arg.towers, include=FROZEN)
  c.optim = dict(name="adamw", lr=3e-3, b1=0.9, b2=0.98, eps=1e-8, wd=0.1,
                 clip_norm=None, lr_mults=((FROZEN, 0.0), (r".*", 1.0)),
                 schedule=dict(name="cosine", warmup_epochs=1, end_lr_fraction=1e-5 / 3e-3))
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.evals = dict(
      zeroshot_modelnet40=dict(type="zeroshot", data=arg.eval_data, split="test",
                               modality="points", every_epochs=10, classnames=MODELNET40,
                               templates=TEMPLATES,
                               pp_modalities={"points": f"fps_points({NUM_POINTS})|"
                                                        "normalize_points"}),
  )
  c.checkpoint = dict(every_epochs=10, keep=3)
  return c
