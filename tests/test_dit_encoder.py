"""The encoder output each Flux / SD3.5 adapter reads: a wrong CLIP vision model stops with one line naming both."""

from __future__ import annotations

import pytest
import torch

from ipa_train.adapter.dit_encoder import check_features, negative_is_black_image
from ipa_train.adapter.dit_formats import detect_dit_config
from ipa_train.errors import EncoderMismatchError

from . import dit_factories as f


def _cfg(state):
    return detect_dit_config(f.flat(state), "x")


@pytest.mark.parametrize("state, good", [
    (f.xlabs_flux(), torch.zeros(2, 768)),
    (f.instantx_flux(blocks=3), torch.zeros(1, 1152)),
    (f.instantx_sd3(blocks=2), torch.zeros(1, 729, 1152)),
])
def test_the_right_encoder_output_passes(state, good):
    check_features(_cfg(state), good)


@pytest.mark.parametrize("state, bad, names", [
    (f.xlabs_flux(), torch.zeros(1, 1024), ("ViT-L/14", "ViT-H/14", "(1, 1024)")),  # ViT-H where ViT-L is needed
    (f.xlabs_flux(), torch.zeros(1, 729, 1152), ("ViT-L/14", "SigLIP")),
    (f.instantx_sd3(blocks=2), torch.zeros(1, 257, 1024), ("SigLIP-so400m/14-384", "ViT-H/14")),
    (f.instantx_sd3(blocks=2), torch.zeros(1, 1152), ("penultimate hidden states", "(1, 1152)")),
    (f.instantx_flux(blocks=3), torch.zeros(1, 768), ("pooled output", "ViT-L/14")),
])
def test_a_wrong_encoder_is_one_line_naming_both(state, bad, names):
    with pytest.raises(EncoderMismatchError) as e:
        check_features(_cfg(state), bad, file="ip_adapter.safetensors")
    text = str(e.value)
    assert "\n" not in text and "ip_adapter.safetensors" in text and all(n in text for n in names), text


def test_negatives():
    assert negative_is_black_image(_cfg(f.xlabs_flux()))
    assert not negative_is_black_image(_cfg(f.instantx_sd3(blocks=2)))
