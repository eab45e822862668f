"""Evaluation: CLIP scores, grades, diversity and weight sweeps."""
