"""Node functions run in-process inside ComfyUI (no server): the evaluate node's scoring and report."""

from __future__ import annotations

import importlib

import pytest


@pytest.fixture()
def eval_mod(kit, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path / "output"))
    return importlib.import_module(kit.__name__ + ".nodes.evaluate")


class FakeClipVision:
    """ComfyUI's CLIP_VISION as the evaluate node uses it: encode_image(image, crop=True)["image_embeds"]."""

    def __init__(self):
        self.crops = []

    def encode_image(self, image, crop=True):
        self.crops.append(crop)
        return {"image_embeds": image.mean(dim=(1, 2)) - 0.5}  # [N, 3]: mean colour minus grey


def _solid(r, g, b):
    import torch

    return torch.tensor([r, g, b], dtype=torch.float32).view(1, 1, 1, 3).expand(1, 8, 8, 3).clone()


def test_evaluate_node_with_clip_vision_only(eval_mod, tmp_path):
    import json

    import torch

    run = eval_mod.evaluate_and_save
    clip_vision = FakeClipVision()
    ref = _solid(1.0, 0.5, 0.5)
    report, combined, grade = run(ref.repeat(2, 1, 1, 1), ref, "a red square", "", clip_vision, save_as="run1")
    data = json.loads(report)
    assert combined == pytest.approx(100.0) and grade == "A+"
    assert data["scores"]["prompt_following"] is None and data["scores"]["diversity"] == pytest.approx(0.0)
    assert any("prompt following skipped" in n for n in data["notes"])
    assert clip_vision.crops and all(c is True for c in clip_vision.crops)
    saved = tmp_path / "output" / "ipadapter_kit" / "evaluations" / "run1.json"
    assert json.loads(saved.read_text()) == data

    images = torch.cat([_solid(1.0, 0.5, 0.5), _solid(0.5, 1.0, 0.5)])  # one matches, one is orthogonal
    _, combined, grade = run(images, ref, "x", "", clip_vision)
    assert combined == pytest.approx(50.0) and grade == "F"


def test_evaluate_node_with_transformers_clip(eval_mod, tmp_path, tiny_clip_dir):
    import json

    run = eval_mod.evaluate_and_save
    ref = _solid(0.2, 0.7, 0.4)
    report, combined, grade = run(ref.repeat(3, 1, 1, 1), ref, "a green square", str(tiny_clip_dir))
    s = json.loads(report)["scores"]
    assert s["preservation"] == pytest.approx(100.0, abs=1e-3) and 0 <= s["prompt_following"] <= 100
    assert combined == pytest.approx((s["preservation"] + s["prompt_following"]) / 2) and grade == s["grade"]
    assert not (tmp_path / "output").exists()  # nothing written without save_as


def test_evaluate_node_needs_a_model(eval_mod):
    from ipa_train.errors import IPAKitError

    run = eval_mod.evaluate_and_save
    with pytest.raises(IPAKitError, match="no CLIP model"):
        run(_solid(1, 1, 1), _solid(1, 1, 1), "x", "  ")
    with pytest.raises(IPAKitError, match="not a file name"):
        run(_solid(1, 1, 1), _solid(1, 1, 1), "x", "", FakeClipVision(), save_as="..")
