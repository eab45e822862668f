"""Dataset layouts, skipped files, errors, and the image transforms."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ipa_train import DatasetError
from ipa_train.training.data import clip_pixels, load_dataset, target_pixels


def _image(path, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_folder_with_captions_skips_bad_files_with_one_warning(tmp_path, caplog):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n")
    _image(tmp_path / "b.jpg", seed=1)  # no caption -> ""
    (tmp_path / "notes.csv").write_text("x,y\n")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with caplog.at_level(logging.WARNING, logger="ipa_train.training.data"):
        ds = load_dataset(tmp_path, resolution=16)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "notes.csv" in warnings[0].getMessage() and "broken.png" in warnings[0].getMessage()
    info = ds.describe()
    assert (info["images"], info["captions"], info["skipped"]) == (2, 1, 2)
    assert [s.caption for s in ds.samples] == ["a red square", ""]
    item = ds[0]
    assert item["pixels"].shape == (3, 16, 16) and item["clip_pixels"].shape == (3, 224, 224)
    assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1


def test_reference_json_layout(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    _image(root / "1.png")
    _image(root / "2.png", seed=2)
    spec = [{"image_file": "1.png", "text": "A dog"}, {"image_file": "2.png", "text": "A cat"},
            {"image_file": "missing.png", "text": "gone"}]
    (tmp_path / "data.json").write_text(json.dumps(spec))
    ds = load_dataset(root, tmp_path / "data.json", resolution=16)
    assert [s.caption for s in ds.samples] == ["A dog", "A cat"]
    assert ds.describe()["skipped_files"] == ["missing.png (missing)"]
    # the JSON file alone: images resolved next to it
    (root / "data.json").write_text(json.dumps(spec[:2]))
    assert len(load_dataset(root / "data.json")) == 2


def test_metadata_jsonl_layout(tmp_path):
    _image(tmp_path / "x.png")
    _image(tmp_path / "y.png", seed=3)
    lines = [{"file_name": "x.png", "text": "first"}, {"file_name": "y.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = load_dataset(tmp_path)
    assert ds.describe()["source"] == "jsonl"
    assert [s.caption for s in ds.samples] == ["first", "second"]


def test_missing_and_empty_datasets_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(DatasetError, match="no usable image") as e:
        load_dataset(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json"):
        load_dataset(tmp_path, tmp_path / "bad.json")


def test_clip_pixels_match_transformers_clip_image_processor():
    """Exact against the PIL processor (what the reference script ran: transformers 4's CLIPImageProcessor);
    transformers 5's default processor resizes with torch (antialiased bicubic) and may differ by one 8-bit level."""
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8))  # non-square, like chelsea
    ours = clip_pixels(img)
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        CLIPImageProcessorPil = CLIPImageProcessor
    exact = CLIPImageProcessorPil()(images=img, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(ours, exact, rtol=0, atol=1e-6)
    default = CLIPImageProcessor()(images=img, return_tensors="pt").pixel_values[0]
    one_level = 1 / 255 / min(0.26862954, 0.26130258, 0.27577711)
    assert (ours - default).abs().max() <= one_level + 1e-5


def test_target_pixels_crop_and_flip():
    img = Image.new("RGB", (60, 30))
    img.paste((255, 255, 255), (0, 0, 30, 30))  # left half white
    center = target_pixels(img, 20)
    assert center.shape == (3, 20, 20)
    flipped = [target_pixels(img, 20, random_flip=True, rng=__import__("random").Random(s)) for s in range(8)]
    assert any(torch.equal(f, center) for f in flipped) and any(torch.equal(f, center.flip(-1)) for f in flipped)
    crops = {tuple(target_pixels(img, 20, random_crop=True, rng=__import__("random").Random(s))[0, 10].tolist())
             for s in range(8)}
    assert len(crops) > 1
