"""Pieces shared by the paper-scale recipes (ImageNet zero-shot / COCO retrieval evaluators)."""

# The 80 CLIP ImageNet prompt templates are long; these 7 are CLIP's recommended subset.
IMAGENET_TEMPLATES = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)


def paper_evals(pp_image: str, *, every_steps: int, imagenet_classnames=()):
  """Zero-shot ImageNet (needs class names; big_mm ships none) and COCO retrieval."""
  evals = dict(
      retrieval_coco=dict(type="retrieval", data="coco_captions", split="val",
                          every_steps=every_steps, pp_image=pp_image),
  )
  if imagenet_classnames:
    evals["zeroshot_imagenet"] = dict(type="zeroshot", data="imagenet2012", split="validation",
                                      every_steps=every_steps, pp_image=pp_image,
                                      classnames=imagenet_classnames, templates=IMAGENET_TEMPLATES)
  return evals
