"""Datasets that lie: truncated and oversized images, decompression bombs, narrow strips, 16-bit and float
images, captions that are not UTF-8, paths that leave the dataset folder, malformed metadata."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipa_train import DatasetError
from ipa_train.images import ImageRejected, open_rgb
from ipa_train.training.data import load_dataset

ROOT = Path(__file__).resolve().parent.parent


def _image(path, size=(40, 30), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _grey_png(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of zeros, compressed: tiny on disk whatever its size."""
    raw = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(height)), 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height with (almost) no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def _skipped(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_lying_images_are_skipped_and_named_with_the_reason(tmp_path, caplog):
    _image(tmp_path / "good.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "bomb.png").write_bytes(_bomb_png(40_000, 40_000))  # 1.6 G pixels claimed
    (tmp_path / "big.png").write_bytes(_bomb_png(12_000, 12_000))  # 144 MP: over the limit at 32 px
    (tmp_path / "strip.png").write_bytes(_grey_png(1, 60_000))
    with caplog.at_level(logging.WARNING, logger="ipa_train.training.data"):
        ds = load_dataset(tmp_path, resolution=32)
    assert [s.path.name for s in ds.samples] == ["good.png"]
    text = _skipped(caplog)
    assert "truncated.jpg (truncated: the file ends before" in text
    assert "bomb.png (decompression bomb: the header claims 1600 MP" in text
    assert "big.png (decompression bomb: the header claims 144 MP" in text
    assert "strip.png (1 x 60000 pixels: aspect ratio 1:60000" in text
    assert ds.describe()["skipped"] == 4
    (tmp_path / "big.png").write_bytes(_bomb_png(8200, 8200))  # 67.2 MP: under PIL's limit, over ours at 32 px
    with pytest.raises(ImageRejected, match="8200 x 8200 pixels, more than the 67 MP allowed at resolution 32"):
        open_rgb(tmp_path / "big.png", 32)


def test_narrow_strip_png_peak_memory_stays_small(tmp_path):
    """A few hundred bytes of PNG decoding to 1 x 60000: refused before any resize; RSS grows < 500 MB."""
    (tmp_path / "ok.png").write_bytes(_grey_png(8, 8))
    (tmp_path / "strip.png").write_bytes(_grey_png(1, 60_000))
    assert (tmp_path / "strip.png").stat().st_size < 1000
    code = (
        "import resource, sys\n"
        "from ipa_train.training.data import load_dataset\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"ds = load_dataset({str(tmp_path)!r}, resolution=512)\n"
        "ds[0]\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(len(ds), (after - before) / 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n, grown_mb = out.stdout.split()
    assert int(n) == 1
    assert float(grown_mb) < 500, f"loading grew RSS by {grown_mb} MB"


def test_sixteen_bit_and_float_images_keep_their_values(tmp_path):
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)  # 0 .. 63000
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(open_rgb(tmp_path / "g16.png", 64))
    np.testing.assert_allclose(rgb[..., 0], np.round(grey16 / 65535 * 255), atol=1)
    assert (rgb[..., 0] == rgb[..., 2]).all()
    flt = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(flt, mode="F").save(tmp_path / "f.tif")
    rgb = np.asarray(open_rgb(tmp_path / "f.tif", 64))
    np.testing.assert_allclose(rgb[..., 1], np.round(flt * 255), atol=1)
    ds = load_dataset(tmp_path, resolution=8)
    assert len(ds) == 2
    assert float(ds.target(0).max()) > 0.9 and float(ds.target(0).min()) < -0.9  # not all white (or black)


def test_open_rgb_refuses_empty_and_non_images(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(ImageRejected, match="not an image"):
        open_rgb(tmp_path / "x.png", 64)


def test_caption_not_utf8_is_read_and_named(tmp_path, caplog):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\u00e9 au lait".encode("cp1252"))
    _image(tmp_path / "b.png", seed=1)
    (tmp_path / "b.txt").write_bytes("\ufeffbom caption".encode())
    with caplog.at_level(logging.WARNING, logger="ipa_train.training.data"):
        ds = load_dataset(tmp_path, resolution=16)
    assert [s.caption for s in ds.samples] == ["caf\u00e9 au lait", "bom caption"]
    assert "a.txt (caption not UTF-8" in _skipped(caplog)


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_paths_leaving_the_dataset_folder_are_refused_by_name(tmp_path, caplog, layout):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    _image(root / "sub" / "in.png")
    _image(tmp_path / "secret.png", seed=1)
    os.symlink(tmp_path / "secret.png", root / "link.png")
    names = ["sub/in.png", "../secret.png", str(tmp_path / "secret.png"), "link.png", "sub/../sub/in.png"]
    if layout == "json":
        (root / "captions.json").write_text(json.dumps([{"image_file": n, "text": "t"} for n in names]))
        args = (root, root / "captions.json")
    else:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": n, "text": "t"}) for n in names))
        args = (root,)
    with caplog.at_level(logging.WARNING, logger="ipa_train.training.data"):
        ds = load_dataset(*args, resolution=16)
    assert [s.shown for s in ds.samples] == ["sub/in.png", "sub/../sub/in.png"]
    skipped = ds.describe()["skipped_files"]
    assert skipped[0].startswith("../secret.png (outside the dataset folder")
    assert skipped[1].startswith(f"{tmp_path / 'secret.png'} (absolute path")
    assert skipped[2].startswith("link.png (outside the dataset folder")
    assert "../secret.png (outside" in _skipped(caplog)


def test_folder_link_leaving_the_folder_is_skipped(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    _image(root / "a.png")
    _image(tmp_path / "outside.png", seed=1)
    os.symlink(tmp_path / "outside.png", root / "b.png")
    ds = load_dataset(root, resolution=16)
    assert [s.path.name for s in ds.samples] == ["a.png"]
    assert ds.describe()["skipped_files"][0].startswith("b.png (outside the dataset folder")


@pytest.mark.parametrize("content, expected", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"image_file": 1}', "expected a JSON list"),
    ('[{"image_file": 7, "text": "x"}]', "entry 0 is"),
    ('[{"image_file": "a.png", "text": {"en": "x"}}]', "entry 0 ('a.png') has a dict as 'text'"),
    (b'[{"image_file": "a.png", "text": "caf\xe9"}]', "not UTF-8 (byte 0xe9"),
])
def test_malformed_captions_json_is_one_line_error(tmp_path, content, expected):
    _image(tmp_path / "a.png")
    f = tmp_path / "c.json"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError, match="c.json") as e:
        load_dataset(tmp_path, f)
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content, expected", [
    ("[" * 100_000 + "]" * 100_000, "line 1: nested too deeply"),
    (b'{"file_name": "a.png", "text": "\xff\xfe"}', "not UTF-8"),
    ('{"file_name": "a.png"}\n{oops', "line 2: not valid JSON"),
])
def test_malformed_metadata_jsonl_is_one_line_error(tmp_path, content, expected):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError, match="metadata.jsonl") as e:
        load_dataset(tmp_path)
    assert expected in str(e.value) and "\n" not in str(e.value)
