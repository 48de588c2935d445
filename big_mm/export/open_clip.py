"""open_clip export (placeholder until implemented)."""
from big_mm.export.common import ExportError


def export_open_clip(params, model_kwargs, out_dir, **kw):
  raise ExportError("open_clip export is not implemented yet.")
