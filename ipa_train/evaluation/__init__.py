"""Evaluation: CLIP scores (preservation, prompt following, grade, diversity), weight sweeps and their reports.

`scores` holds the definitions of every score; `embedders` the CLIP models behind them; `sweep` the weight sweep and
its plot; `report` the JSON report.
"""

from .embedders import CLIPEmbedder, FunctionImageEmbedder, ImageEmbedder
from .report import EvalReport, load_image
from .scores import GRADES, SCALES, Scorer, Scores, clipscore, diversity, grade
from .sweep import SweepPoint, SweepResult, WeightSweep, backbone_generator, parse_weights, plot_sweep

__all__ = [
    "CLIPEmbedder", "EvalReport", "FunctionImageEmbedder", "GRADES", "ImageEmbedder", "SCALES", "Scorer", "Scores",
    "SweepPoint", "SweepResult", "WeightSweep", "backbone_generator", "clipscore", "diversity", "grade", "load_image",
    "parse_weights", "plot_sweep",
]
