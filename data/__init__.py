"""Dataset builders and small bundled data (the demo's `digits_captions`)."""
