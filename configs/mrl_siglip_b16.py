r"""Matryoshka SigLIP B/16: configs/siglip_b16.py trained with nested embedding prefixes (MRL).

  python -m big_mm.train --config configs/mrl_siglip_b16.py:data=my_dataset --workdir gs://bucket/mrl_siglip_b16

Intended hardware: as configs/siglip_b16.py (TPU v4-32 or larger / 16+ H100s, global batch
32k, ring loss). The 7 prefix losses share one pass over the towers (a few extra B x B loss
evaluations per step, the towers' cost unchanged).
Changes from siglip_b16: objective.matryoshka_dims = (12, 24, 48, 96, 192, 384, 768), the
doubling nesting the MRL paper (Kusupati et al. 2022, arXiv 2205.13147) uses for 768-d ViT-B/16
and ALIGN embeddings, all weights 1; both towers get a 768-d head (model.out_dim=768) so that
`tools/export.py --embed_dim K` can write a K-d model exactly. The zero-shot ImageNet and COCO
evaluators report every prefix too (eval/zeroshot_imagenet/accuracy@d12 ...).
Expected result: the full 768-d embedding near siglip_b16's (ImageNet zero-shot 76.0% for the
released WebLI model, see that docstring), and each prefix close to a model trained at that dim
alone. The MRL paper's own vision-language experiment is ALIGN-MRL (ViT-B/16 image encoder,
BERT text encoder, softmax loss, ALIGN data); its abstract claims representations "at least as
accurate" as independently trained low-dimensional ones and up to 14x smaller embeddings at the
same ImageNet-1K accuracy (that figure is for classification). Its per-dim ALIGN-MRL zero-shot
numbers could not be verified here (only the abstract was reachable), so no number is
targeted for the prefixes; measure the independent K-d baselines with
`--config.objective.matryoshka_dims="()" --config.model.out_dim=K`.
Arguments: those of configs/siglip_b16.py (data, batch, examples, variant, res).
"""
from configs import siglip_b16

MATRYOSHKA_DIMS = (12, 24, 48, 96, 192, 384, 768)


def get_config(arg=None):
  c = siglip_b16.get_config(arg)
  c.model.out_dim = 768
  c.objective.matryoshka_dims = MATRYOSHKA_DIMS
  return c
