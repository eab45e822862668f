"""Every CLI subcommand against a table of bad inputs: exit status 2, no traceback, one line naming the input."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ipa_train import cli

ROOT = Path(__file__).resolve().parent.parent


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """A folder of bad inputs the table refers to as {bad}/NAME."""
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.bin").write_text("just some notes\n")
    (d / "pointer.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    (d / "empty.safetensors").write_bytes(b"")
    (d / "evil.bin").write_bytes(pickle.dumps({"w": _Evil()}, protocol=2))
    (d / "weights-less").mkdir()
    (d / "a-file").write_text("not a folder")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    (d / "cut.jpg").write_bytes(buf.getvalue()[:200])
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(d / "ok.png")
    (d / "out-dir").mkdir()
    return d


TRAIN = ["train", "--base-model", "{bad}/no-model", "--image-encoder", "{bad}/no-encoder", "--data", "{bad}"]
EVAL = ["evaluate", "--tiny", "--reference", "{bad}/ok.png", "--prompt", "p"]

CASES = [
    # (argv, text the one line must contain)
    (["inspect", "{bad}/missing.safetensors"], "missing.safetensors: no such file"),
    (["inspect", "{bad}/notes.bin"], "notes.bin: is a text file"),
    (["inspect", "{bad}/pointer.safetensors"], "pointer.safetensors: is a git-lfs pointer"),
    (["inspect", "{bad}/empty.safetensors"], "empty.safetensors: the file is empty"),
    (["inspect", "{bad}/evil.bin"], "evil.bin: refused: this pickle would call posix.system"),
    (["inspect", "{bad}/weights-less"], "weights-less: is a folder without a weight file"),
    (["convert", "{bad}/notes.bin", "{bad}/x.safetensors"], "notes.bin: is a text file"),
    (["convert", "{bad}/evil.bin", "{bad}/a-file/x.safetensors"], "a-file"),
    (["convert", "{bad}/evil.bin", "{bad}/out-dir"], "out-dir' is a folder"),
    ([*TRAIN, "--steps", "0"], "steps must be a whole number from 1"),
    ([*TRAIN, "--lr", "nan"], "lr must be a finite number"),
    ([*TRAIN, "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    ([*TRAIN, "--weight-decay", "inf"], "weight_decay must be a finite number"),
    ([*TRAIN, "--seed", "-3"], "seed must be a whole number from 0"),
    ([*TRAIN, "--name", ".hidden"], "name '.hidden' must be a plain file name"),
    ([*TRAIN, "--resolution", "100"], "resolution must be a multiple of 8"),
    ([*TRAIN, "--output", "{bad}/a-file"], "a-file' is a file, not a folder"),
    ([*TRAIN, "--output", "{bad}/run", "--resume", "latest"], "resume=latest: no checkpoint-* folder"),
    ([*TRAIN, "--output", "{bad}/run", "--init-adapter", "{bad}/pointer.safetensors"], "pointer.safetensors: is a git-lfs"),
    (["train", "--base-model", "m", "--image-encoder", "e", "--data", "{bad}/nope", "--output", "{bad}/run"],
     "nope' does not exist"),
    ([*EVAL, "--sweep", "--fusion-lambda", "2"], "argument --fusion-lambda: expected a finite number from 0 to 1"),
    ([*EVAL, "--sweep", "--weights", "0.5", "nan"], "argument --weights: expected a finite number"),
    ([*EVAL, "--sweep", "--steps", "0"], "argument --steps: expected a whole number from 1 to 1000, got 0"),
    ([*EVAL, "--sweep", "--size", "100"], "--size must be a multiple of 8"),
    ([*EVAL, "--sweep", "--seeds", "-1"], "argument --seeds: expected a whole number from 0"),
    ([*EVAL, "--images", "{bad}/ok.png", "--json", "{bad}/a-file/report.json"], "a-file"),
    ([*EVAL, "--images", "{bad}/ok.png", "--json", "{bad}/out-dir"], "out-dir' is a folder"),
    ([*EVAL, "--sweep", "--plot", "{bad}/a-file/plot.png"], "a-file"),
    (["evaluate", "--tiny", "--reference", "{bad}/cut.jpg", "--prompt", "p", "--images", "{bad}/ok.png"],
     "cut.jpg': truncated"),
    (["evaluate", "--tiny", "--reference", "{bad}/gone.png", "--prompt", "p", "--images", "{bad}/ok.png"],
     "gone.png' not found"),
    (["demo", "--output", "{bad}/a-file"], "a-file' is a file, not a folder"),
    (["demo", "--output", "{bad}/demo", "--steps", "0"], "--steps must be from 1"),
    (["demo", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["inspect"], "the following arguments are required: file"),
    (["fly"], "invalid choice: 'fly'"),
]


def _argv(argv: list[str], bad: Path) -> list[str]:
    return [a.replace("{bad}", str(bad)) for a in argv]


def _check(rc: int, err: str, expected: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(c[0][:2]) + f" #{i}" for i, c in enumerate(CASES)])
def test_bad_input_in_process(argv, expected, bad, capsys):
    try:
        rc = cli.main(_argv(argv, bad))
    except SystemExit as e:  # argparse errors exit from inside parse_args
        rc = e.code
    out, err = capsys.readouterr()
    _check(rc, err, expected)
    assert not (bad / "x.safetensors").exists() and not (bad / "demo" / "loss.png").exists()


SUBPROCESS = [CASES[2], CASES[4], CASES[11], CASES[21], CASES[30]]


def test_bad_input_subprocesses_never_show_a_traceback(bad):
    """The real entry point, with its logging set up: still one line on stderr."""
    for argv, expected in SUBPROCESS:
        r = subprocess.run([sys.executable, "-m", "ipa_train", *_argv(argv, bad)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        _check(r.returncode, r.stderr, expected)
        assert r.stdout == ""


def test_messages_are_one_printable_line():
    assert cli.one_line("a\nb\x1b[31mred") == "a\\nb\\x1b[31mred"
