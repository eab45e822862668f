"""Evaluation: scales, grades, diversity, the weight sweep, reports, the CLI and the node, on a tiny random CLIP."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ipa_train.errors import EvaluationError
from ipa_train.evaluation import CLIPEmbedder, EvalReport, Scorer, clipscore, diversity, grade, parse_weights
from ipa_train.evaluation.embedders import image_list
from ipa_train.evaluation.scores import CLIPSCORE_WEIGHT, image_similarity_score
from ipa_train.evaluation.sweep import DEFAULT_WEIGHTS, SweepResult, WeightSweep


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return CLIPEmbedder.from_pretrained(tiny_clip_dir, device="cpu")


def distinct_images() -> torch.Tensor:
    """Three very different [48, 64] images as an IMAGE batch [3, 48, 64, 3]."""
    g = torch.Generator().manual_seed(0)
    red = torch.zeros(48, 64, 3)
    red[..., 0] = 1.0
    ramp = torch.linspace(0, 1, 64).view(1, 64, 1).expand(48, 64, 3)
    return torch.stack([red, ramp, torch.rand(48, 64, 3, generator=g)])


class ColorEmbedder:
    """Fake CLIP: an image's embedding is its mean colour minus grey; a text's is a fixed direction."""

    def __init__(self, text_vector=(1.0, 0.0, 0.0)):
        self.text_vector = torch.tensor([text_vector])
        self.calls = 0

    def embed_images(self, images):
        self.calls += 1
        v = torch.stack([x.mean(dim=(0, 1)) - 0.5 for x in image_list(images)])  # [N, 3]
        return F.normalize(v, dim=-1)

    def embed_texts(self, texts):
        return F.normalize(self.text_vector.expand(len(texts), 3), dim=-1)


def solid(r, g, b, size=8) -> torch.Tensor:
    return torch.tensor([r, g, b], dtype=torch.float32).view(1, 1, 3).expand(size, size, 3).clone()


# ---- scales and grades -------------------------------------------------------------------------------------


@pytest.mark.parametrize("score, expected", [
    (100.0, "A+"), (90.0, "A+"), (89.99, "A"), (80.0, "A"), (79.99, "B"), (70.0, "B"),
    (69.99, "C"), (60.0, "C"), (59.99, "F"), (0.0, "F"),
])
def test_grade_boundaries(score, expected):
    assert grade(score) == expected


def test_grade_of_nan_is_an_error():
    with pytest.raises(EvaluationError, match="NaN"):
        grade(math.nan)


def test_text_scale_is_clipscore():
    assert CLIPSCORE_WEIGHT == 2.5
    cos = torch.tensor([-0.3, 0.0, 0.2, 0.3, 0.4, 0.9])
    assert clipscore(cos).tolist() == pytest.approx([0.0, 0.0, 50.0, 75.0, 100.0, 100.0])


def test_image_scale():
    cos = torch.tensor([-0.5, 0.0, 0.5, 1.0])
    assert image_similarity_score(cos).tolist() == pytest.approx([0.0, 0.0, 50.0, 100.0])


def test_diversity_formula():
    e = torch.eye(3)
    assert diversity(e) == pytest.approx(100.0)  # orthogonal pairs
    assert diversity(e[[0, 0, 0]]) == pytest.approx(0.0)
    a = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=-1)  # cos 0.7071
    assert diversity(a) == pytest.approx(100 * (1 - 2**-0.5), abs=1e-4)
    assert diversity(e[:1]) is None


# ---- scoring with a fake embedder ------------------------------------------------------------------------


def test_scores_with_a_fake_embedder():
    fake = ColorEmbedder(text_vector=(1.0, 0.0, 0.0))
    reference = solid(1.0, 0.5, 0.5)[None]  # embedding (1, 0, 0)
    images = torch.stack([solid(1.0, 0.5, 0.5), solid(0.5, 1.0, 0.5)])  # (1, 0, 0) and (0, 1, 0)
    s = Scorer(text_model=fake).score(images, reference, "red")
    assert s.per_image["preservation"] == pytest.approx([100.0, 0.0])
    assert s.per_image["prompt_following"] == pytest.approx([100.0, 0.0])
    assert s.preservation == pytest.approx(50.0)
    assert s.combined == pytest.approx(50.0) and s.grade == "F"
    assert s.diversity == pytest.approx(100.0)


def test_image_model_and_text_model_are_used_for_their_scores():
    image_model, text_model = ColorEmbedder(), ColorEmbedder(text_vector=(0.0, 1.0, 0.0))
    img = solid(1.0, 0.5, 0.5)[None]
    s = Scorer(image_model, text_model).score(img, img, "green")
    assert s.preservation == pytest.approx(100.0)
    assert s.prompt_following == pytest.approx(0.0)  # the text model's own image embedding, orthogonal to its text
    assert image_model.calls == 2 and text_model.calls == 1


def test_without_text_model_prompt_following_is_skipped():
    scorer = Scorer(image_model=ColorEmbedder())
    img = solid(1.0, 0.5, 0.5)[None]
    s = scorer.score(img, img, "anything")
    assert s.prompt_following is None and s.combined == s.preservation == pytest.approx(100.0)
    assert s.grade == "A+" and s.diversity is None
    assert "prompt following skipped" in scorer.notes[0]


def test_scorer_needs_a_model():
    with pytest.raises(EvaluationError, match="no CLIP model"):
        Scorer()


def test_bad_image_shape_is_named():
    with pytest.raises(EvaluationError, match=r"\(2, 3, 8, 8\)"):
        image_list(torch.zeros(2, 3, 8, 8))


# ---- the tiny CLIP ---------------------------------------------------------------------------------------


def test_identical_images_preservation_100_diversity_0(clip):
    ref = distinct_images()[2]
    s = Scorer(text_model=clip).score(ref[None].repeat(4, 1, 1, 1), ref[None], "a photo of noise")
    assert s.preservation == pytest.approx(100.0, abs=1e-3)
    assert s.diversity == pytest.approx(0.0, abs=1e-3)
    assert 0.0 <= s.prompt_following <= 100.0
    assert s.combined == pytest.approx((s.preservation + s.prompt_following) / 2)


def test_different_images_have_diversity(clip):
    images = distinct_images()
    s = Scorer(text_model=clip).score(images, images[:1], "red")
    assert s.diversity > 0.01
    assert s.per_image["preservation"][0] == pytest.approx(100.0, abs=1e-3)
    assert max(s.per_image["preservation"][1:]) < 100.0 - 1e-3


def test_pil_and_tensor_inputs_embed_alike(clip):
    x8 = (distinct_images()[1] * 255).round().to(torch.uint8)
    pil, x = Image.fromarray(x8.numpy()), x8.float() / 255  # the same 8-bit pixels
    assert torch.allclose(clip.embed_images([pil]), clip.embed_images(x[None]), atol=1e-5)
    e = clip.embed_texts(["a cat", "the dog on the mat"])
    assert e.shape == (2, 24) and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_unloadable_clip_folder_is_named(tmp_path):
    with pytest.raises(EvaluationError, match="empty_clip"):
        CLIPEmbedder.from_pretrained(tmp_path / "empty_clip")  # not a folder: treated as a hub id, refused by name
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="full transformers CLIPModel"):
        CLIPEmbedder.from_pretrained(tmp_path / "empty")


# ---- weight sweep ----------------------------------------------------------------------------------------


def fake_generate(calls):
    def generate(weight, mode, seed):
        calls.append((weight, mode, seed))
        shift = 0.3 if mode == "fused" else 0.0
        return solid(0.5 + weight / 3, 0.5 + shift + 0.01 * seed, 0.6)  # more "reference" (red) as weight rises
    return generate


def test_sweep_shape_and_plot():
    calls, progress = [], []
    reference = solid(1.0, 0.5, 0.5)[None]
    sweep = WeightSweep(Scorer(text_model=ColorEmbedder()), reference, "red")
    result = sweep.run(fake_generate(calls), progress=lambda done, total: progress.append((done, total)))
    assert result.weights == list(DEFAULT_WEIGHTS) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert result.modes == ["scaled", "fused"] and result.seeds == [0, 1, 2]
    assert len(calls) == 7 * 2 * 3 and len(set(calls)) == len(calls)
    assert progress[-1] == (42, 42)
    assert [(p.mode, p.weight) for p in result.points] == [(m, w) for m in ("scaled", "fused") for w in DEFAULT_WEIGHTS]
    for metric in ("preservation", "prompt_following", "diversity", "combined"):
        for mode in result.modes:
            values = result.series(mode, metric)
            assert len(values) == 7 and all(v is not None and 0.0 <= v <= 100.0 for v in values)
    pres = result.series("scaled", "preservation")
    assert pres == sorted(pres) and pres[-1] > pres[0]  # the fake images move towards the reference
    img = result.plot()
    assert img.size == (900, 380) and img.mode == "RGB"
    colors = {c for _, c in img.getcolors(maxcolors=1 << 16)}
    assert (30, 90, 200) in colors and (40, 160, 70) in colors  # preservation and diversity lines drawn
    assert result.plot(size=(400, 200)).size == (400, 200)


def test_sweep_rejects_bad_settings():
    scorer = Scorer(image_model=ColorEmbedder())
    with pytest.raises(EvaluationError, match="'blend'"):
        WeightSweep(scorer, solid(1, 1, 1)[None], "x", modes=["scaled", "blend"])
    sweep = WeightSweep(scorer, solid(1, 1, 1)[None], "x", weights=[1.0], modes=["scaled"], seeds=[0])
    with pytest.raises(EvaluationError, match="returned 2 images"):
        sweep.run(lambda w, m, s: torch.zeros(2, 8, 8, 3))


def test_parse_weights():
    assert parse_weights("0, 0.25,0.5 1.5") == [0.0, 0.25, 0.5, 1.5]
    assert parse_weights(" 1, 1.0, 0 ") == [1.0, 0.0]  # duplicates once, order kept
    assert parse_weights(", ".join(str(w) for w in DEFAULT_WEIGHTS)) == list(DEFAULT_WEIGHTS)
    with pytest.raises(EvaluationError, match="'half' is not a number"):
        parse_weights("0, half, 1")
    with pytest.raises(EvaluationError, match="at least one"):
        parse_weights(" , ")
    with pytest.raises(EvaluationError, match="'nan' is not a finite"):
        parse_weights("nan")


def test_report_json_round_trip(tmp_path):
    scorer = Scorer(text_model=ColorEmbedder())
    ref = solid(1.0, 0.5, 0.5)[None]
    scores = scorer.score(torch.stack([solid(1.0, 0.5, 0.5), solid(0.6, 0.9, 0.5)]), ref, "red")
    sweep = WeightSweep(scorer, ref, "red", weights=[0.0, 1.0], seeds=[0, 1]).run(fake_generate([]))
    report = EvalReport(clip="fake", prompt="red", scores=scores, sweep=sweep, inputs={"images": 2}, notes=["n"])
    path = report.save(tmp_path / "sub" / "report.json")
    data = json.loads(path.read_text())
    assert data["scores"]["grade"] == scores.grade and len(data["sweep"]["points"]) == 4
    assert "CLIPScore" in data["scales"]["prompt_following"]
    again = EvalReport.load(path)
    assert again.to_dict() == report.to_dict()
    assert isinstance(again.sweep, SweepResult) and again.sweep.series("fused", "diversity") == sweep.series("fused", "diversity")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(EvaluationError, match="bad.json"):
        EvalReport.load(bad)


# ---- command line (in-process: the same code as `python -m ipa_train evaluate`) ----------------------------


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_images")
    paths = []
    for i, x in enumerate(distinct_images()):
        p = folder / f"img{i}.png"
        Image.fromarray((x * 255).round().to(torch.uint8).numpy()).save(p)
        paths.append(str(p))
    return paths


def test_cli_scores_image_files(tiny_clip_dir, image_files, tmp_path, capsys):
    from ipa_train.cli import main

    out = tmp_path / "report.json"
    rc = main(["evaluate", "--clip", str(tiny_clip_dir), "--reference", image_files[0], "--prompt", "a red square",
               "--images", image_files[0], image_files[0], "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "preservation      100.0 / 100" in text and "diversity           0.0 / 100" in text and "grade" in text
    report = EvalReport.load(out)
    assert report.scores.images == 2 and report.scores.preservation == pytest.approx(100.0, abs=1e-3)
    assert report.inputs["images"] == [image_files[0]] * 2 and report.clip == str(tiny_clip_dir)

    rc = main(["evaluate", "--clip", str(tiny_clip_dir), "--reference", image_files[0], "--prompt", "x",
               "--images", *image_files])
    assert rc == 0 and float(capsys.readouterr().out.split("diversity")[1].split("/")[0]) > 0


def test_cli_errors_name_the_problem(tiny_clip_dir, image_files, tmp_path, capsys):
    from ipa_train.cli import main

    missing = str(tmp_path / "nope.png")
    assert main(["evaluate", "--clip", str(tiny_clip_dir), "--reference", image_files[0], "--prompt", "x",
                 "--images", missing]) == 2
    assert "nope.png" in capsys.readouterr().err
    assert main(["evaluate", "--clip", str(tiny_clip_dir), "--reference", image_files[0], "--prompt", "x",
                 "--sweep"]) == 2
    err = capsys.readouterr().err
    assert "--base-model" in err and "--adapter" in err and "--tiny" in err
    assert main(["evaluate", "--reference", image_files[0], "--prompt", "x", "--images", image_files[0]]) == 2
    assert "--clip" in capsys.readouterr().err


def test_cli_tiny_sweep(image_files, tmp_path, capsys):
    from ipa_train.cli import main

    plot, out = tmp_path / "sweep.png", tmp_path / "sweep.json"
    rc = main(["evaluate", "--sweep", "--tiny", "--reference", image_files[1], "--prompt", "a grey ramp",
               "--weights", "0", "1.5", "--seeds", "0", "1", "--steps", "1", "--size", "32",
               "--plot", str(plot), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "scaled mode" in text and "fused mode" in text
    report = EvalReport.load(out)
    assert [(p.mode, p.weight) for p in report.sweep.points] == [("scaled", 0.0), ("scaled", 1.5), ("fused", 0.0), ("fused", 1.5)]
    assert all(p.prompt_following is not None and p.diversity is not None for p in report.sweep.points)
    scaled0, fused0 = report.sweep.points[0], report.sweep.points[2]
    assert scaled0.preservation == fused0.preservation  # weight 0 is the unpatched model in both modes
    with Image.open(plot) as img:
        assert img.size == (900, 380)
