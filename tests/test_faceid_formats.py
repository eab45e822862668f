"""FaceID files: every h94 layout loads from .bin and .safetensors, is detected by its row, and inspect reports it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ipa_train.adapter.formats import inspect_file, load_adapter, save_adapter
from ipa_train.errors import AdapterFormatError, EncoderMismatchError
from tests.faceid_factories import FACE_OFFICIAL, FaceOfficial, lora_rank_for, write_face

_BY_NAME = {o.name: o for o in FACE_OFFICIAL}


@pytest.fixture(scope="module")
def face_files(tmp_path_factory):
    """Every official FaceID file in both containers, written once."""
    root = tmp_path_factory.mktemp("faceid")
    files = {}
    for o in FACE_OFFICIAL:
        for container in ("bin", "safetensors"):
            path = root / f"{o.name}.{container}"
            write_face(o, path, container, seed=len(files))
            files[(o.name, container)] = path
    return files


@pytest.mark.parametrize("container", ["bin", "safetensors"])
@pytest.mark.parametrize("o", FACE_OFFICIAL, ids=[o.name for o in FACE_OFFICIAL])
def test_inspect_reports_every_faceid_file(face_files, o: FaceOfficial, container):
    info = inspect_file(face_files[(o.name, container)])
    assert info["projection"] == o.projection
    assert info["variant"] == o.projection
    assert info["family"] == o.family
    assert info["num_tokens"] == o.tokens
    assert info["face_embedding_dim"] == 512
    assert info["lora_rank"] == (lora_rank_for(o) if o.lora else None)
    assert info["encoder"] == o.encoder
    assert info["cross_attention_layers"] == (16 if o.family == "sd15" else 70)


def test_inspect_json_cli(face_files, capsys):
    from ipa_train.cli import main

    assert main(["inspect", str(face_files[("ip-adapter-faceid-plusv2_sd15", "bin")]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["projection"], info["num_tokens"], info["lora_rank"], info["face_embedding_dim"], info["encoder"]) == (
        "faceid-plusv2", 4, 4, 512, "ViT-H/14")
    assert main(["inspect", str(face_files[("ip-adapter-faceid-portrait_sd15", "safetensors")]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["projection"], info["num_tokens"], info["lora_rank"], info["encoder"]) == ("faceid-portrait", 16, None, "none")


def test_plain_files_report_no_face_fields(tmp_path):
    from tests.factories import OFFICIAL, write_official

    write_official(OFFICIAL[0], tmp_path / "a.safetensors", "safetensors")
    info = inspect_file(tmp_path / "a.safetensors")
    assert info["face_embedding_dim"] is None and info["lora_rank"] is None


def test_file_name_facts_and_override(face_files, tmp_path):
    """plusv2 and unnorm come from the file name; a renamed file is read by its keys and can be overridden."""
    renamed = tmp_path / "my_face_model.bin"
    shutil.copy(face_files[("ip-adapter-faceid-plusv2_sd15", "bin")], renamed)
    assert inspect_file(renamed)["projection"] == "faceid-plus"
    assert inspect_file(renamed, "faceid-plusv2")["projection"] == "faceid-plusv2"
    assert load_adapter(renamed, variant="faceid-plusv2").config.projection == "faceid-plusv2"
    # the other direction: a plusv2-named file read as v1
    assert load_adapter(face_files[("ip-adapter-faceid-plusv2_sd15", "bin")], variant="faceid-plus").config.projection == "faceid-plus"

    unnorm = tmp_path / "portrait_sdxl.safetensors"
    shutil.copy(face_files[("ip-adapter-faceid-portrait_sdxl_unnorm", "safetensors")], unnorm)
    assert inspect_file(unnorm)["projection"] == "plus"  # keys alone: a resampler over a 512-wide input
    assert inspect_file(unnorm, "faceid-portrait-unnorm")["projection"] == "faceid-portrait-unnorm"


def test_override_that_does_not_fit_is_one_line(face_files):
    with pytest.raises(AdapterFormatError, match=r"cannot be read as a faceid-plusv2 adapter: its keys fit faceid-portrait") as e:
        load_adapter(face_files[("ip-adapter-faceid-portrait_sd15", "bin")], variant="faceid-plusv2")
    assert "\n" not in str(e.value)


def test_lora_rides_along_and_round_trips(face_files, tmp_path):
    src = face_files[("ip-adapter-faceid_sd15", "safetensors")]
    a = load_adapter(src)
    assert len(a.lora) == 32 * 8  # 32 processors x q/k/v/out x down/up
    assert a.lora["1.to_k_lora.down.weight"].shape == (128, 768)
    assert a.lora["0.to_k_lora.down.weight"].shape == (128, 8)
    out = save_adapter(a, tmp_path / "again.safetensors")
    b = load_adapter(out)
    assert b.config.projection == "faceid" and b.config.lora_rank == 128
    for k, t in a.lora.items():
        assert torch.equal(b.lora[k], t)
    for (k, t), (_, u) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(t, u), k


def test_damaged_lora_is_named(tmp_path):
    o = _BY_NAME["ip-adapter-faceid_sd15"]
    from tests.faceid_factories import face_groups

    groups = face_groups(o)
    groups["ip_adapter"]["3.to_q_lora.down.weight"] = torch.zeros(7, 8)
    torch.save(groups, tmp_path / "ip-adapter-faceid_sd15.bin")
    with pytest.raises(AdapterFormatError, match=r"'ip_adapter.3.to_q_lora.down.weight' has shape \(7, 8\).*rank 128"):
        load_adapter(tmp_path / "ip-adapter-faceid_sd15.bin")


def test_faceid_adapter_refuses_clip_and_plain_refuses_faces(face_files):
    from tests.factories import OFFICIAL, official_config, random_adapter

    face = load_adapter(face_files[("ip-adapter-faceid_sd15", "bin")])
    with pytest.raises(EncoderMismatchError, match="reads face embeddings.*FaceID encode node"):
        face.project(torch.zeros(1, 1024))
    with pytest.raises(EncoderMismatchError, match=r"needs face embeddings \[N, 512\]"):
        face.project_face(torch.zeros(1, 1024))
    plain = random_adapter(official_config(OFFICIAL[0]))
    with pytest.raises(EncoderMismatchError, match="not a FaceID adapter"):
        plain.project_face(torch.zeros(1, 512))
    plus = load_adapter(face_files[("ip-adapter-faceid-plus_sd15", "bin")])
    with pytest.raises(Exception, match="also needs the CLIP vision model"):
        plus.project_face(torch.zeros(1, 512))
