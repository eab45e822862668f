"""Reference images before the patch: preparation, noise negatives, tiles, per-frame weight schedules (host-free)."""
