"""Face embeddings of a training set: computed once, cached as safetensors, faceless images skipped by name."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from ipa_train.errors import DatasetError  # noqa: E402
from ipa_train.face import FaceAnalyzer, FaceModels  # noqa: E402
from ipa_train.training.face_cache import build_face_cache, load_face_cache  # noqa: E402
from tests.face_standins import face_image, write_pack  # noqa: E402


def test_cache_round_trip_and_skips(tmp_path, caplog):
    analyzer = FaceAnalyzer(FaceModels(write_pack(tmp_path / "pack"), "cpu"))
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        img = face_image(seed=i) if i != 1 else np.zeros((120, 120, 3), np.uint8)
        Image.fromarray(img).save(p)
        paths.append(str(p))
    with caplog.at_level(logging.WARNING):
        cache = build_face_cache(paths, analyzer, tmp_path / "face_embeds.safetensors", crop_size=224)
    assert cache.files == [paths[0], paths[2]]
    assert "1.png (no face found)" in caplog.text
    assert cache.embeds.shape == (2, 512) and cache.crops.shape == (2, 224, 224, 3)
    direct = analyzer.analyze(face_image(seed=2))
    torch.testing.assert_close(cache.embeds[1], torch.from_numpy(direct.embedding))
    torch.testing.assert_close(cache.normed().norm(dim=-1), torch.ones(2))
    again = load_face_cache(tmp_path / "face_embeds.safetensors")
    assert again.files == cache.files and torch.equal(again.embeds, cache.embeds)
    assert (tmp_path / "face_embeds.safetensors").read_bytes()[:1] != b"\x80"  # not a pickle


def test_no_face_anywhere_and_damaged_cache(tmp_path):
    analyzer = FaceAnalyzer(FaceModels(write_pack(tmp_path / "pack"), "cpu"))
    p = tmp_path / "blank.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(p)
    with pytest.raises(DatasetError, match="no face found in any of the 1 images"):
        build_face_cache([p], analyzer, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a face-embedding cache"):
        load_face_cache(tmp_path / "bad.safetensors")
