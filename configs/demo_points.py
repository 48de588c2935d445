r"""Demo: ULIP-style point cloud / image / text binding on `cgal_shapes` (CGAL's demo meshes).

Tri-modal records (data/cgal_shapes.py): a shape's surface sampled into a point cloud, its
rendering (64 px, shaded) in the same random rotation, and its name as text ("cow", the
"name" field); 121 shapes, 4 train views each, 2 held-out test views (other rotations, other
surface samples). Three towers: points by a small point_transformer (Point-BERT-style FPS + kNN
patches), images by a small ViT, text by a small text transformer; pairwise binding (softmax
loss) over (points, text), (points, image), (image, text).

ULIP-2 (Xue et al. 2024, section 3; salesforce/ULIP) trains only the 3D encoder against frozen,
pre-trained image and text towers. With nothing pre-trained at this scale, all three towers
train jointly by default; `init=WORKDIR` is the ULIP-2 recipe's second stage: the image and
text towers are copied from a finished run of this config (config.init) and frozen
(optim.lr_mults 0), and only the points tower (and t) trains.

Training pp of the points: a random 256-point subset of the stored 2,048, normalised, any
random rotation (SO(3): the test views are arbitrarily rotated), ULIP's random scale and
clipped jitter. Evaluation: the test split, 256 farthest points.
Metrics (eval/<name>/...): retrieval_points_text and retrieval_points_image
(points2text / text2points / points2image / image2points R@1; class_R@1 counts a hit when the
top candidate is a view of the same shape: chance 1/121 = 0.008), zeroshot_points/accuracy
(3D classification of each test cloud over the 121 shape names, embedded as they are), and
image_text2points/image+text2points/class_R@1 (a view's rendering and name retrieve its cloud:
by Symile's / GRAM's own score, or for pairwise binding the sum of the two cosines).

Commands (from the repo root, after `python data/cgal_shapes.py`, which needs
`apt-get install libcgal-demo`):

  python -m big_mm.train --config configs/demo_points.py --workdir /tmp/points
  python -m big_mm.train --config configs/demo_points.py:objective=symile --workdir /tmp/pts_sym
  python -m big_mm.train --config configs/demo_points.py:init=/tmp/points --workdir /tmp/pts2

Hardware: any CPU (measured on 2 shared cores, 1 device; README.md / docs/benchmarks.md give
the measured numbers and wall time).
Arguments: objective (pairwise|symile|gram: Symile / GRAM over (points, image, text) in place
of the pairs), init (a finished run's workdir: frozen image / text towers), steps, batch.
"""
from big_mm import config as config_lib

MODALITIES = ("points", "image", "text")
# The shape names of cgal_shapes in label order (libcgal-demo 5.5.1: 121 shapes).
NAMES = (
    "3torus", "alstom test4", "chinese dragon 10kv", "p", "anchor", "anchor dense", "armadillo",
    "b9 mesh", "beam", "bear", "bear bis", "blade", "blob", "blob closed", "blobby",
    "blobby 3cc", "boeing", "bones", "bull", "bunny00", "cactus", "camel", "cheese",
    "cheese box", "corner", "corner poly", "corner tris with hole", "corner with sharp edge",
    "couplingdown", "cow", "cross", "cube meshed", "cube ouvert", "cylinder",
    "cylinder locally refined", "degtri sliding", "dino", "diplodocus", "double torus 3 holes",
    "double torus example", "dragknob", "eight", "elephant", "elephant with holes", "elk",
    "ellipe0.003", "ellipsoid", "fandisk", "fandisk box", "fandisk large", "femur", "fold",
    "geosphere", "hand", "handle", "head", "hedra", "helmet", "hole", "holes", "homer",
    "horizons", "horizons domain", "icosahedron", "in", "joint", "knot", "knot1", "knot2",
    "larger sphere", "lion", "lion head", "man", "mannequin devil", "mask cone",
    "mech holes shark", "mesh with border", "mesh with colors", "mpi", "mushroom", "nefertiti",
    "negative", "oblong", "oblong shuffled", "octahedron", "part", "patch 01", "patch 13",
    "patch 20", "patch 21", "patch 23", "patch 30", "pig", "pinion", "pinion small", "pipe",
    "plane", "poly2x^2+y^2 0.062500", "polygon mesh", "prim", "pyramid", "quads to stitch",
    "quint tris", "reference tetrahedron", "refined elephant", "retinal", "rotor",
    "rotor small", "sphere966", "spool", "star", "tet shuffled",
    "tetra intersected by triangle", "three peaks", "torus quad", "triangle",
    "triangular hole", "triceratops", "tripod", "turbine", "u")
NUM_POINTS = 256
TRAIN_PP_POINTS = (f"sample_points({NUM_POINTS})|normalize_points|random_rotate_points('so3')|"
                   "random_scale_points(0.8, 1.25)|jitter_points(0.01, 0.05)")
EVAL_PP_POINTS = f"fps_points({NUM_POINTS})|normalize_points"
PP_IMAGE = "decode|resize(32)|value_range(-1,1)"


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, objective="pairwise", init="", steps=300, batch=32)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_steps = arg.steps
  c.log_every_steps = 50

  c.input = dict(data="cgal_shapes", split="train", modalities=MODALITIES,
                 pp_modalities={"points": TRAIN_PP_POINTS}, pp_image=PP_IMAGE,
                 text_column="name", tokenizer="data/digits_speech_spm.model", text_len=24,
                 num_workers=0)

  c.model_name = "towers"
  c.model = dict(
      towers=dict(
          points=dict(width=64, depth=2, num_heads=4, num_groups=32, group_size=16, pool="max"),
          image=dict(width=64, depth=2, mlp_dim=256, num_heads=4, patch_size=(4, 4),
                     posemb="learn", pool="gap"),
          text=dict(width=64, depth=2, mlp_dim=256, num_heads=4, vocab_size=192, pool="last"),
      ),
      out_dim=64, temperature_init=10.0, bias_init=None)
  if arg.objective == "pairwise":
    c.objective = dict(name="binding", loss="softmax",
                       pairs=(("points", "text", 1.0), ("points", "image", 1.0),
                              ("image", "text", 1.0)))
  else:
    c.objective = dict(name="binding", pairs=(), higher_order=arg.objective,
                       higher_order_modalities=MODALITIES, gram_anchor="text")

  c.optim = dict(name="adamw", lr=2e-3, b1=0.9, b2=0.95, wd=1e-4, clip_norm=1.0,
                 schedule=dict(name="cosine", warmup_steps=min(50, arg.steps // 10)))
  if arg.init:  # ULIP-2: the image and text towers from a finished run, frozen.
    c.init = dict(workdir=arg.init, include=r"(img|txt)/.*")
    c.optim.lr_mults = ((r"(img|txt)/.*", 0.0), (r".*", 1.0))

  pp_eval = {"points": EVAL_PP_POINTS}
  c.evals = dict(
      retrieval_points_text=dict(type="retrieval", split="test", every_steps=arg.steps,
                                 modalities=("points", "text"), pp_modalities=pp_eval),
      retrieval_points_image=dict(type="retrieval", split="test", every_steps=arg.steps,
                                  modalities=("points", "image"), pp_modalities=pp_eval,
                                  pp_image=PP_IMAGE),
      image_text2points=dict(type="higher_order_retrieval", split="test", every_steps=arg.steps,
                             query=("image", "text"), target="points", pp_modalities=pp_eval),
      zeroshot_points=dict(type="zeroshot", split="test", every_steps=arg.steps,
                           modality="points", pp_modalities=pp_eval, classnames=NAMES,
                           templates=("{}",)),
  )
  c.checkpoint = dict(every_steps=arg.steps, keep=1)
  return c
