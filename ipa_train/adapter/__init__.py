"""Adapter format and math: configs, projection modules, weight files, layer layouts, attention."""
