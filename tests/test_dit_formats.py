"""Flux and SD3.5 IP-Adapter files: each official layout is a row of the variant table, as .bin and safetensors."""

from __future__ import annotations

import json

import pytest
import torch

from ipa_train import AdapterFormatError, inspect_file, load_adapter
from ipa_train.adapter.dit_formats import DIT_VARIANTS, find_variant
from ipa_train.adapter.dit_modules import DitAdapter
from ipa_train.cli import main

from . import dit_factories as f


@pytest.mark.parametrize("name", sorted(f.FILES))
def test_inspect_reports_each_official_layout(name, tmp_path):
    build, filename, fmt, family, tokens, encoder, blocks = f.FILES[name]
    path = f.write(build(), tmp_path / filename)
    info = inspect_file(path)
    assert (info["format"], info["family"], info["num_tokens"], info["encoder"], info["blocks"]) == (
        fmt, family, tokens, encoder, blocks)
    assert info["non_finite_tensors"] == []
    assert info["parameters"] == sum(t.numel() for t in f.flat(build()).values())


def test_instantx_flux_splits_double_and_single_blocks(tmp_path):
    info = inspect_file(f.write(f.instantx_flux(), tmp_path / "ip-adapter.bin"))
    assert (info["double_blocks"], info["single_blocks"]) == (19, 38)
    info = inspect_file(f.write(f.xlabs_flux(), tmp_path / "x.safetensors"))
    assert (info["double_blocks"], info["single_blocks"]) == (19, 0)


def test_every_row_has_a_test_file():
    assert {v.format for v in DIT_VARIANTS} == {row[2] for row in f.FILES.values()}


def test_cli_inspect_json(tmp_path, capsys):
    path = f.write(f.instantx_sd3(), tmp_path / "ip-adapter.bin")
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd3" and info["format"] == "instantx-sd3" and info["blocks"] == 38
    assert info["num_tokens"] == 64 and info["encoder"] == "SigLIP-so400m/14-384"


def test_cli_inspect_text(tmp_path, capsys):
    path = f.write(f.xlabs_flux(tokens=16), tmp_path / "ip_adapter.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "xlabs-flux" in out and "flux" in out and "ViT-L/14" in out
    assert "transformer blocks patched" in out and "19" in out


@pytest.mark.parametrize("name", sorted(f.FILES))
def test_load_gives_a_dit_adapter_with_the_file_tensors(name, tmp_path):
    build, filename, *_ = f.FILES[name]
    state = build()
    adapter = load_adapter(f.write(state, tmp_path / filename))
    assert isinstance(adapter, DitAdapter) and len(adapter.blocks) == f.FILES[name][-1]
    flat = f.flat(state)
    k0 = next(k for k in flat if k.endswith(("0.to_k_ip.weight", "0.processor.ip_adapter_double_stream_k_proj.weight")))
    assert torch.equal(adapter.blocks[0].to_k_ip.weight, flat[k0])
    assert adapter.num_parameters() == sum(t.numel() for t in flat.values())


def test_unet_layouts_are_not_dit_rows():
    from .factories import OFFICIAL, official_groups

    for o in OFFICIAL:
        groups = official_groups(o)
        assert find_variant({f"{g}.{k}": v for g, d in groups.items() for k, v in d.items()}) is None, o.name


def test_projections_give_tokens_of_the_measured_shape(tmp_path):
    fx = load_adapter(f.write(f.instantx_flux(), tmp_path / "a.bin"))
    assert fx.image_proj(torch.randn(2, 1152)).shape == (2, 128, 24)
    xl = load_adapter(f.write(f.xlabs_flux(tokens=16), tmp_path / "b.safetensors"))
    assert xl.image_proj(torch.randn(3, 768)).shape == (3, 16, 24)
    sd3 = load_adapter(f.write(f.instantx_sd3(), tmp_path / "c.bin"))
    tokens, temb = sd3.image_proj(torch.randn(2, 729, 1152), torch.tensor([500.0, 20.0]))
    assert tokens.shape == (2, 64, 128) and temb.shape == (2, 128)


# --------------------------------------------------------------------------------------------------------
# Damaged files: one line naming the file and what was expected.


def _drop(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _set(key, value):
    return lambda sd: {**sd, key: value}


BAD = [
    ("xlabs", _drop("double_blocks.7.processor.ip_adapter_double_stream_k_proj.weight"), "numbered"),
    ("xlabs", _drop("double_blocks.3.processor.ip_adapter_double_stream_v_proj.bias"),
     "missing key 'double_blocks.3.processor.ip_adapter_double_stream_v_proj.bias'"),
    ("xlabs", _set("double_blocks.2.processor.ip_adapter_double_stream_v_proj.weight", torch.zeros(32, 7)),
     "expected (32, 24)"),
    ("xlabs", _set("ip_adapter_proj_model.proj.weight", torch.zeros(96, 1024)), "ViT-L/14 gives 768"),
    ("xlabs", _set("ip_adapter_proj_model.proj.weight", torch.zeros(100, 768)), "not a multiple of the token width"),
    ("flux", _set("ip_adapter.5.to_k_ip.weight", torch.zeros(32, 24, dtype=torch.int64)), "int64"),
    ("flux", _drop("image_proj.proj.0.bias"), "missing 1 keys (image_proj.proj.0.bias)"),
    ("flux", _set("image_proj.extra.weight", torch.zeros(3)), "unexpected 1 keys (image_proj.extra.weight)"),
    ("flux", _set("image_proj.proj.0.weight", torch.zeros(16, 1024)), "SigLIP-so400m/14-384 gives 1152"),
    ("sd3", _set("ip_adapter.37.norm_ip_k.weight", torch.zeros(32)), "ip_adapter.37.norm_ip_k.weight"),
    ("sd3", _drop("image_proj.layers.1.0.norm1.weight"), "missing 1 keys (image_proj.layers.1.0.norm1.weight)"),
    ("sd3", _set("image_proj.latents", torch.zeros(64, 128)), "expected a non-empty 3-d tensor"),
]
_BUILDERS = {"xlabs": f.xlabs_flux, "flux": f.instantx_flux, "sd3": f.instantx_sd3}


@pytest.mark.parametrize("kind, change, expected", BAD)
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_damaged_files_fail_with_one_line(kind, change, expected, suffix, tmp_path):
    path = f.write(change(f.flat(_BUILDERS[kind]())), tmp_path / f"bad{suffix}")
    for call in (inspect_file, load_adapter):
        with pytest.raises(AdapterFormatError) as e:
            call(path)
        text = str(e.value)
        assert "\n" not in text and path.name in text and expected in text, text


@pytest.mark.parametrize("kind", sorted(_BUILDERS))
def test_truncated_files(kind, tmp_path):
    for suffix, what in ((".safetensors", "truncated"), (".bin", "truncated")):
        path = f.write(_BUILDERS[kind](), tmp_path / f"t{suffix}")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(AdapterFormatError, match=what) as e:
            inspect_file(path)
        assert "\n" not in str(e.value) and path.name in str(e.value)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_pickled_code_in_a_dit_layout_is_refused(tmp_path):
    state = f.instantx_flux(blocks=3)
    state["ip_adapter"]["evil"] = _Evil()
    path = tmp_path / "ip-adapter.bin"
    torch.save(state, path)
    with pytest.raises(AdapterFormatError, match="refused: this pickle would call") as e:
        inspect_file(path)
    assert "\n" not in str(e.value)


def test_non_finite_dit_tensors_are_named(tmp_path, caplog):
    sd = f.flat(f.xlabs_flux())
    sd["double_blocks.4.processor.ip_adapter_double_stream_k_proj.weight"][0, 0] = float("nan")
    info = inspect_file(f.write(sd, tmp_path / "nan.safetensors"))
    assert info["non_finite_tensors"] == ["double_blocks.4.processor.ip_adapter_double_stream_k_proj.weight"]
    assert "NaN" in caplog.text


def test_unet_only_nodes_refuse_a_dit_adapter_in_one_line(tmp_path):
    from ipa_train.errors import IPAKitError

    adapter = load_adapter(f.write(f.xlabs_flux(), tmp_path / "x.safetensors"))
    for call in (adapter.check_clip_input, adapter.project, adapter.image_kv):
        with pytest.raises(IPAKitError, match="does not take the xlabs-flux") as e:
            call(torch.zeros(1, 768))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["instantx-flux-safetensors", "instantx-sd3-bin"])
def test_convert_to_bin_writes_the_official_nested_torch_file(name, tmp_path, capsys):
    """`convert X.safetensors Y.bin`: the tencent / InstantX `.bin` (nested image_proj / ip_adapter dicts of plain
    tensors, readable with weights_only=True) that packs reading only torch files take; our loader reads it back."""
    build, filename, *_ = f.FILES[name]
    state = build()
    src = f.write(state, tmp_path / filename)
    dst = tmp_path / "out" / "ip-adapter.bin"
    assert main(["convert", str(src), str(dst)]) == 0
    assert f"{f.FILES[name][2]} adapter, {f.FILES[name][-1]} transformer blocks" in capsys.readouterr().out
    nested = torch.load(dst, map_location="cpu", weights_only=True)
    assert set(nested) == {"image_proj", "ip_adapter"}
    official = state if "image_proj" in state else {g: {k.partition(".")[2]: v for k, v in f.flat(state).items()
                                                        if k.startswith(g + ".")} for g in ("image_proj", "ip_adapter")}
    for group in ("image_proj", "ip_adapter"):
        assert nested[group].keys() == official[group].keys()
        assert all(torch.equal(nested[group][k], official[group][k]) for k in official[group])
    again = load_adapter(dst)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), load_adapter(src).state_dict().values()))


def test_convert_to_bin_refuses_a_layout_without_one(tmp_path, capsys):
    src = f.write(f.xlabs_flux(), tmp_path / "ip_adapter.safetensors")
    dst = tmp_path / "ip_adapter.bin"
    assert main(["convert", str(src), str(dst)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ip_adapter.bin" in err[0] and ".safetensors" in err[0] and "official .bin" in err[0]
    assert not dst.exists() and not list(tmp_path.glob(".ip_adapter.bin.*"))
