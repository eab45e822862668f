"""The host-free face pipeline equals InsightFace 2.1 on tiny stand-in models: boxes, landmarks, crops, embeddings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from ipa_train.errors import FaceError  # noqa: E402
from ipa_train.face import FaceAnalyzer, FaceModels, find_model_folder, norm_crop  # noqa: E402
from tests.face_standins import face_image, write_detector, write_pack, write_recognizer  # noqa: E402

IMAGES = [
    face_image(seed=0),
    face_image(300, 260, faces=((40, 30, 128), (200, 180, 64)), seed=1),  # two faces: scores and NMS order
    face_image(200, 200, faces=((16, 16, 168),), seed=2),  # a face filling the frame
]


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    write_pack(root / "models" / "tiny_l")
    return root


@pytest.fixture(scope="module")
def ours(pack):
    return FaceAnalyzer(FaceModels(find_model_folder(pack, "tiny_l"), provider="cpu"), retry_sizes=(640,))


@pytest.fixture(scope="module")
def reference(pack):
    insightface_app = pytest.importorskip("insightface.app")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = insightface_app.FaceAnalysis(name="tiny_l", root=str(pack), providers=["CPUExecutionProvider"],
                                           allowed_modules=["detection", "recognition"])
        app.prepare(ctx_id=-1, det_size=(640, 640))
    return app


@pytest.mark.parametrize("k", range(len(IMAGES)))
def test_detection_and_embedding_equal_insightface(ours, reference, k):
    rgb = IMAGES[k]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = reference.get(np.ascontiguousarray(rgb[..., ::-1]))  # InsightFace takes BGR
    dets, kps, _ = ours.detect(rgb)
    assert len(theirs) == len(dets) >= 1
    for face, box, points in zip(theirs, dets, kps):
        np.testing.assert_allclose(box[:4], face.bbox, atol=1e-4)
        np.testing.assert_allclose(box[4], face.det_score, atol=1e-6)
        np.testing.assert_allclose(points, face.kps, atol=1e-4)
    face = ours.analyze(rgb)
    ref = theirs[0]
    cos = float(face.embedding @ ref.embedding / np.linalg.norm(face.embedding) / np.linalg.norm(ref.embedding))
    assert cos >= 0.99999
    np.testing.assert_allclose(face.normed_embedding, ref.normed_embedding, atol=1e-5)


@pytest.mark.parametrize("size", [112, 224, 256])
def test_aligned_crops_byte_identical(reference, ours, size):
    """OpenCV's own warp kernel is matched byte for byte; with Intel IPP (the wheels' default) a few pixels whose value
    lands on .5 differ by one level."""
    cv2 = pytest.importorskip("cv2")
    from insightface.utils import face_align

    for rgb in IMAGES:
        face = ours.analyze(rgb, crop_sizes=(size,))
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        use_ipp = cv2.ipp.useIPP()
        try:
            cv2.ipp.setUseIPP(False)
            ref = face_align.norm_crop(bgr, face.kps, size)[..., ::-1]
        finally:
            cv2.ipp.setUseIPP(use_ipp)
        assert np.array_equal(face.crops[size], ref)
        ipp = face_align.norm_crop(bgr, face.kps, size)[..., ::-1]
        diff = np.abs(ipp.astype(int) - face.crops[size])
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-2


def test_alignment_matches_on_random_landmarks():
    cv2 = pytest.importorskip("cv2")
    from insightface.utils import face_align

    rng = np.random.default_rng(5)
    use_ipp = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    try:
        for _ in range(6):
            img = rng.integers(0, 256, (int(rng.integers(60, 300)), int(rng.integers(60, 300)), 3), dtype=np.uint8)
            kps = (face_align.arcface_dst * rng.uniform(0.5, 2.5) + rng.uniform(0, 40, (1, 2))
                   + rng.normal(0, 2, (5, 2))).astype(np.float32)
            for size in (112, 224, 256):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ref = face_align.norm_crop(img, kps, size)
                assert np.array_equal(norm_crop(img, kps, size), ref)
    finally:
        cv2.ipp.setUseIPP(use_ipp)


def test_retry_smaller_sizes_and_pick_largest(pack):
    models = FaceModels(find_model_folder(pack, "tiny_l"), provider="cpu")
    rgb = IMAGES[1]
    by_score = FaceAnalyzer(models, pick="score").analyze(rgb)
    largest = FaceAnalyzer(models, pick="largest").analyze(rgb)
    assert (largest.bbox[2] - largest.bbox[0]) >= (by_score.bbox[2] - by_score.bbox[0])
    # a small face: nothing at the first size (64), found at the next one
    small = face_image(320, 320, faces=((96, 96, 24),), seed=3)
    assert FaceAnalyzer(models, retry_sizes=(64,)).analyze(small) is None
    face = FaceAnalyzer(models, retry_sizes=(64, 640)).analyze(small)
    assert face is not None and face.det_size == 640


def test_no_face_stops_naming_the_image_or_skips(ours, caplog):
    blank = np.zeros((120, 120, 3), np.uint8)
    with pytest.raises(FaceError, match=r"no face found in image 1 of the batch") as e:
        ours.analyze_batch([IMAGES[0], blank])
    assert "\n" not in str(e.value)
    faces = ours.analyze_batch([IMAGES[0], blank, IMAGES[0]], skip_missing=True)
    assert faces[1] is None and faces[0] is not None and faces[2] is not None
    assert "image 1" in caplog.text


def test_gray_rgba_and_float_images(ours):
    rgb = IMAGES[0]
    base = ours.analyze(rgb)
    gray = ours.analyze(rgb.mean(axis=2).astype(np.uint8))
    assert gray is not None
    rgba = ours.analyze(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2))
    np.testing.assert_array_equal(rgba.embedding, base.embedding)
    as_float = ours.analyze((rgb.astype(np.float32) + 0.5) / 255.0)
    np.testing.assert_array_equal(as_float.embedding, base.embedding)
    with pytest.raises(FaceError, match=r"16x16 pixels: too small"):
        ours.analyze(np.zeros((16, 16, 3), np.uint8))


def test_missing_and_wrong_model_folders(tmp_path):
    with pytest.raises(FaceError, match=r"face models 'buffalo_l' not found: put det_10g.onnx, w600k_r50.onnx.*models/buffalo_l"):
        find_model_folder(tmp_path, "buffalo_l")
    wrong = tmp_path / "models" / "two_recognizers"
    wrong.mkdir(parents=True)
    write_recognizer(wrong / "det_10g.onnx")  # a recognizer where the detector should be
    with pytest.raises(FaceError, match=r"no detector \(SCRFD.*among det_10g.onnx"):
        FaceModels(find_model_folder(tmp_path, "two_recognizers"), provider="cpu")
    truncated = tmp_path / "models" / "broken"
    truncated.mkdir(parents=True)
    write_detector(truncated / "det_10g.onnx")
    data = (truncated / "det_10g.onnx").read_bytes()
    (truncated / "det_10g.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(FaceError, match=r"det_10g.onnx: cannot be opened as an ONNX model.*truncated"):
        FaceModels(find_model_folder(tmp_path, "broken"), provider="cpu")


def test_nested_zip_folder_and_provider_choice(tmp_path):
    write_pack(tmp_path / "models" / "antelopev2" / "antelopev2")
    assert find_model_folder(tmp_path, "antelopev2").name == "antelopev2"
    with pytest.raises(FaceError, match=r"execution provider 'warp-drive' is not offered"):
        FaceModels(find_model_folder(tmp_path, "antelopev2"), provider="warp-drive")


def test_onnxruntime_missing_is_one_line(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    write_pack(tmp_path / "models" / "buffalo_l")
    with pytest.raises(FaceError, match=r"needs onnxruntime.*pip install onnxruntime.*onnxruntime-gpu.*\[face\]") as e:
        FaceModels(find_model_folder(tmp_path, "buffalo_l"))
    assert "\n" not in str(e.value)
