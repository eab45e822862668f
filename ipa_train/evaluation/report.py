"""The JSON report of an evaluation or a sweep, and reading images for the command line."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..adapter.formats import atomic_write
from ..errors import EvaluationError
from .scores import SCALES, Scores
from .sweep import SweepResult

REPORT_VERSION = 1


@dataclass
class EvalReport:
    """Everything an evaluation found, as JSON (`to_json`, `save`, `load`)."""

    clip: str
    prompt: str
    scores: Scores | None = None
    sweep: SweepResult | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    scales: dict[str, str] = field(default_factory=lambda: dict(SCALES))
    version: int = REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "clip": self.clip, "prompt": self.prompt,
                "scores": self.scores.to_dict() if self.scores else None,
                "sweep": self.sweep.to_dict() if self.sweep else None,
                "inputs": self.inputs, "notes": self.notes, "scales": self.scales}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        return cls(clip=d["clip"], prompt=d["prompt"], scores=Scores(**d["scores"]) if d.get("scores") else None,
                   sweep=SweepResult.from_dict(d["sweep"]) if d.get("sweep") else None, inputs=d.get("inputs", {}),
                   notes=list(d.get("notes", [])), scales=dict(d.get("scales", SCALES)),
                   version=int(d.get("version", REPORT_VERSION)))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON, atomically."""
        path = Path(path)
        text = self.to_json()
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalReport:
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EvaluationError(f"{os.fspath(path)!r} is not a readable evaluation report ({e})") from None


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file as 8-bit RGB (size-checked before decoding), or an `EvaluationError` naming the file."""
    from ..images import ImageRejected, open_rgb

    if not os.path.isfile(path):
        raise EvaluationError(f"image {os.fspath(path)!r} not found; give an image file")
    try:
        return open_rgb(path, 224)  # CLIP scores at 224 px
    except ImageRejected as e:
        raise EvaluationError(f"cannot use image {os.fspath(path)!r}: {e}") from None
