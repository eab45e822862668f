"""Malformed weight files: every one is a one-line `AdapterFormatError` naming the file and what was expected."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ipa_train import AdapterFormatError, convert_checkpoint, inspect_file, load_adapter, save_adapter
from ipa_train.adapter.config import CONFIG_METADATA_KEY

from .factories import OFFICIAL, official_config, official_groups, random_adapter

PLAIN = next(o for o in OFFICIAL if o.name == "ip-adapter_sd15")


def _flat(groups):
    return {f"{g}.{k}": v for g, d in groups.items() for k, v in d.items()}


def _drop_layers(sd):
    sd = {k: v for k, v in sd.items() if not k.startswith("ip_adapter.")}
    sd["ip_adapter.extra.weight"] = torch.zeros(2, 2)
    return sd


def _one_line(e: pytest.ExceptionInfo, name: str) -> str:
    text = str(e.value)
    assert "\n" not in text and "\x1b" not in text and name in text
    return text


@pytest.mark.parametrize("change, expected", [
    (lambda sd: {**sd, "image_proj.proj.weight": sd["image_proj.proj.weight"].flatten()},
     "plain projection's tensors have unexpected shapes"),
    (lambda sd: {**sd, "ip_adapter.1.to_k_ip.weight": sd["ip_adapter.1.to_k_ip.weight"][..., None, None]},
     "non-empty tensors with 1 to 3 dimensions"),
    (lambda sd: {**sd, "ip_adapter.1.to_v_ip.weight": sd["ip_adapter.1.to_v_ip.weight"][0]},
     "must both be [hidden, 768]"),
    (lambda sd: {**sd, "image_proj.norm.bias": torch.zeros(0)}, "'image_proj.norm.bias' has shape (0,)"),
    (lambda sd: {**sd, "ip_adapter.1.to_k_ip.weight": sd["ip_adapter.1.to_k_ip.weight"].long()},
     "holds int64 values; adapter weights are floating point"),
    (_drop_layers, "has no numbered layers; expected keys '1.to_k_ip.weight'"),
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith("ip_adapter.")}, "no 'ip_adapter'"),
], ids=["rank", "rank4", "rank-layer", "empty", "int", "no-layers", "no-ip-adapter"])
def test_malformed_layout_is_one_line_refusal(tmp_path, change, expected):
    path = tmp_path / "bad.safetensors"
    save_file(change(_flat(official_groups(PLAIN))), str(path))
    for call in (inspect_file, load_adapter, lambda p: convert_checkpoint(p, tmp_path / "out.safetensors")):
        with pytest.raises(AdapterFormatError) as e:
            call(path)
        assert expected in _one_line(e, "bad.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("edit, expected", [
    ({"num_tokens": -4}, "num_tokens is -4"),
    ({"num_tokens": 2.5}, "num_tokens is 2.5"),
    ({"cross_attention_dim": "768"}, "cross_attention_dim is '768'"),
    ({"layer_hidden_sizes": []}, "layer_hidden_sizes is []"),
    ({"layer_hidden_sizes": [8, -1]}, "layer_hidden_sizes is [8, -1]"),
    ({"layer_hidden_sizes": [8.5]}, "layer_hidden_sizes is [8.5]"),
    ({"resampler": {"dim": 0}}, "resampler is"),
    ("[" * 50_000, "not JSON"),
    ("[1, 2]", "a JSON list, not an object"),
])
def test_bad_sizes_in_our_metadata_are_refused(tmp_path, edit, expected):
    path = tmp_path / "kit.safetensors"
    save_adapter(random_adapter(official_config(PLAIN)), path)
    sd = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    if isinstance(edit, dict):
        meta[CONFIG_METADATA_KEY] = json.dumps({**json.loads(meta[CONFIG_METADATA_KEY]), **edit})
    else:
        meta[CONFIG_METADATA_KEY] = edit
    save_file(sd, str(path), metadata=meta)
    with pytest.raises(AdapterFormatError) as e:
        inspect_file(path)
    text = _one_line(e, "kit.safetensors")
    assert expected in text and "expected positive integer sizes" in text


@pytest.mark.parametrize("name, content, expected", [
    ("notes.bin", b"these are my notes\n", "is a text file, not a weights file"),
    ("random.bin", bytes(range(7, 250)) * 4, "is not a weights file (neither safetensors nor a PyTorch"),
    ("pointer.bin", b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 44642268\n",
     "is a git-lfs pointer"),
    ("pointer.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1\n",
     "is a git-lfs pointer"),
    ("page.safetensors", b"<!DOCTYPE html><html><body>Sign in</body></html>", "is a web page"),
])
def test_files_that_are_not_weights_say_what_they_are(tmp_path, name, content, expected):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(AdapterFormatError) as e:
        load_adapter(tmp_path / name)
    text = _one_line(e, name)
    assert expected in text and "could run code" not in text and "run code" not in text


class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("save", ["torch", "pickle2"])
def test_code_carrying_pickle_is_named_plainly(tmp_path, save):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"image_proj": {"proj.weight": _Evil(str(target))}}
    if save == "torch":
        torch.save(obj, path)
    else:
        import pickle

        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(AdapterFormatError) as e:
        load_adapter(path)
    text = _one_line(e, "evil.pt")
    assert "would call posix.system" in text and "Nothing of it was executed" in text
    assert "weights_only" not in text and "trusted source" not in text
    assert not target.exists()


def test_our_checkpoint_folders_are_accepted_by_inspect_and_convert(tmp_path):
    folder = tmp_path / "run" / "checkpoints" / "checkpoint-000003"
    adapter = random_adapter(official_config(PLAIN))
    save_adapter(adapter, folder / "adapter.safetensors")
    (folder / "training_state.json").write_text("{}")
    assert inspect_file(folder)["variant"] == "plain"
    cfg = convert_checkpoint(folder, tmp_path / "out.safetensors")
    assert cfg.cross_attention_layers == 16
    assert torch.equal(load_adapter(tmp_path / "out.safetensors").state_dict()["image_proj.proj.weight"],
                       adapter.state_dict()["image_proj.proj.weight"])
    with pytest.raises(AdapterFormatError, match=r"is a folder of training checkpoints; give one of them, e\.g\. .*checkpoint-000003"):
        inspect_file(folder.parent)


def test_non_finite_weights_are_warned_about(tmp_path, caplog):
    adapter = random_adapter(official_config(PLAIN))
    with torch.no_grad():
        adapter.image_proj.proj.weight[0, 0] = float("nan")
    save_adapter(adapter, tmp_path / "nan.safetensors")
    with caplog.at_level(logging.WARNING, logger="ipa_train"):
        info = inspect_file(tmp_path / "nan.safetensors")
        convert_checkpoint(tmp_path / "nan.safetensors", tmp_path / "out.safetensors")
    assert info["non_finite_tensors"] == ["image_proj.proj.weight"]
    warned = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(warned) == 2 and "nan.safetensors" in warned[0]
