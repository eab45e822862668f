"""The toy shapes-world Flux inside a real ComfyUI: ComfyUI's own Flux model built from the toy's file
(`toy_flux.comfy_toy_flux`) against the diffusers transformer of the same file (`ipa_train.toy.flux`).

- The unpatched model: ComfyUI's prediction (its sigma -> timestep convention, its own 2x2 packing, its
  flow-matching denoised output) gives the diffusers transformer's velocity.
- Our XLabs apply in ComfyUI gives the velocity of our training processors in diffusers; weight 0 is the
  unpatched model exactly.
- IPAKitTrain's training step on the ComfyUI model equals the command line's on the diffusers toy backbone.
- The pretrained model samples the prompt's colour through ComfyUI's own sampler.

Parity does not depend on training: without the shipped file those tests run on a randomly initialised file of
the same layout; the sampling test needs the pretrained file and is skipped without it.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from ipa_train.adapter.dit_formats import training_config
from ipa_train.adapter.dit_modules import DitAdapter
from ipa_train.hosts.comfy.dit import DitEmbeds
from ipa_train.hosts.comfy.dit_apply import apply_dit
from ipa_train.toy import world
from ipa_train.toy.flux import SHIPPED_FLUX, load_flux_components, toy_flux_backbone
from ipa_train.toy.pretrain_flux import SCHEDULE, FluxTextCache, decode_latents, encode_images, sample_flux, velocity
from ipa_train.training.backbone import TextCondition

from .test_host_train_dit import StandInDitClip, StandInDitVae, _clip_vision, _step
from .toy_flux import LATENT_SIDE, comfy_toy_flux, random_toy_file

TOL = 1e-4
SIGMA = 0.62


@pytest.fixture(scope="module", params=["shipped", "pixel"])
def toy_file(request, tmp_path_factory):
    """The shipped pretrained file (or a random one of its layout: parity holds for any weights), and a random
    file with the exact pixel-unshuffle VAE instead of the learned autoencoder (12 latent channels)."""
    if request.param == "shipped" and SHIPPED_FLUX.is_file():
        return SHIPPED_FLUX
    vae = "autoencoder" if request.param == "shipped" else "pixel"
    return random_toy_file(tmp_path_factory.mktemp("toy_flux") / f"random_flux_{vae}.safetensors", vae=vae)


@pytest.fixture(scope="module")
def toy(comfy, toy_file):
    """(diffusers components, ComfyUI ModelPatcher, the command line's xlabs-flux backbone), one file's weights."""
    parts = load_flux_components(toy_file)
    return parts, comfy_toy_flux(comfy, toy_file), toy_flux_backbone("xlabs-flux", components=parts)


def _scenes(n: int, seed: int):
    scenes = world.random_scenes(n, torch.Generator().manual_seed(seed))
    return scenes, [world.caption(s) for s in scenes]


def _inputs(parts, seed: int = 3):
    """Two noised scenes at SIGMA [2, c, 16, 16] and their captions' T5 states [2, S, 64] and pooled CLIP [2, 64]."""
    scenes, captions = _scenes(2, seed)
    x0 = encode_images(parts["vae"], world.render(scenes))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    hidden, pooled = FluxTextCache(parts)(captions)
    return (1 - SIGMA) * x0 + SIGMA * noise, hidden, pooled


def comfy_velocity(patcher, x, hidden, pooled):
    """The velocity of ComfyUI's model call as a sampler's CFG batch makes it (rows cond, uncond; the patcher's
    wrappers and patches), read back from its denoised output x - sigma * v."""
    sigmas = torch.full((x.shape[0],), SIGMA)
    to = dict(patcher.model_options.get("transformer_options", {}))
    to.update(cond_or_uncond=[0, 1], sigmas=sigmas, wrappers=patcher.wrappers)
    with torch.no_grad():
        denoised = patcher.model.apply_model(x, sigmas, c_crossattn=hidden, y=pooled, transformer_options=to)
    return (x - denoised) / SIGMA


def test_comfy_toy_flux_equals_the_diffusers_transformer(toy):
    parts, patcher, _ = toy
    dm = patcher.model.diffusion_model
    c = parts["transformer"].config  # the file's stored transformer config
    assert (dm.hidden_size, dm.num_heads, len(dm.double_blocks), len(dm.single_blocks)) == \
        (c.num_attention_heads * c.attention_head_dim, c.num_attention_heads, c.num_layers, c.num_single_layers)
    assert patcher.model.latent_format.latent_channels == parts["vae"].config.latent_channels
    x, hidden, pooled = _inputs(parts)
    with torch.no_grad():
        theirs = velocity(parts["transformer"], x, torch.full((2,), SIGMA), hidden, pooled)
    ours = comfy_velocity(patcher, x, hidden, pooled)
    diff = (ours - theirs).abs().max().item()
    print(f"toy Flux, ComfyUI vs diffusers: max |diff| {diff:.2e} (velocity up to {theirs.abs().max():.2f})")
    assert diff < TOL


def _xlabs_adapter(cli, seed: int = 4) -> DitAdapter:
    """An XLabs adapter at the toy's sizes, 4 tokens, PyTorch's random init (non-zero K/V in every block)."""
    s = cli.sizes
    cfg = training_config("xlabs-flux", num_tokens=4, context_dim=s.cross_attention_dim, hidden=s.layer_hidden_sizes[0],
                          double=s.double_blocks, single=s.single_blocks, clip_dim=s.clip_embedding_dim("image_embeds"),
                          head_dim=s.head_dim)
    torch.manual_seed(seed)
    return DitAdapter(cfg).float().eval()


def test_xlabs_apply_in_comfy_equals_the_training_processors(toy):
    parts, patcher, cli = toy
    adapter = _xlabs_adapter(cli)
    c = parts["transformer"].config  # XLabs: the text width, every double block
    assert (adapter.config.context_dim, adapter.config.hidden_size, adapter.config.blocks) == \
        (c.joint_attention_dim, c.num_attention_heads * c.attention_head_dim, c.num_layers)
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(1, 768, generator=g), torch.randn(1, 768, generator=g)
    embeds = DitEmbeds(cond, uncond, "xlabs-flux")
    x, hidden, pooled = _inputs(parts)
    sigmas = torch.full((2,), SIGMA)
    cli.attach(adapter)
    try:
        with torch.no_grad():  # rows as ComfyUI's: cond, then uncond
            theirs = cli.predict(x, sigmas, TextCondition(hidden, {"pooled": pooled}),
                                 adapter.image_tokens(torch.cat([cond, uncond]), sigmas))
    finally:
        cli.detach()
    ours = comfy_velocity(apply_dit(patcher, adapter, embeds, weight=1.0), x, hidden, pooled)
    base = comfy_velocity(patcher, x, hidden, pooled)
    diff, effect = (ours - theirs).abs().max().item(), (ours - base).abs().max().item()
    print(f"toy Flux XLabs, ComfyUI apply vs training processors: max |diff| {diff:.2e}, adapter effect {effect:.2e}")
    assert effect > 1e-2 and diff < TOL
    off = comfy_velocity(apply_dit(patcher, adapter, embeds, weight=0.0), x, hidden, pooled)
    assert torch.equal(off, base)


def test_node_step_equals_the_command_line_step(comfy, kit, toy, tmp_path):
    """IPAKitTrain's backbone (ComfyUI's Flux with our training block patches) and the command line's diffusers
    backbone: the same loss and adapter gradients on one batch of scenes (same noise and sigmas)."""
    from ipa_train.training.train import Batch

    parts, patcher, cli = toy
    nodes = importlib.import_module(kit.__name__ + ".nodes.train_dit")
    width = parts["text_encoder"].config.hidden_size
    node = nodes.ComfyDitBackbone(patcher, StandInDitClip(comfy, width, width), StandInDitVae(comfy),
                                  _clip_vision(comfy, tmp_path, siglip=False))
    assert node.schedule == cli.schedule and node.guidance_input is cli.guidance_input is False
    assert (node.sizes.cross_attention_dim, node.sizes.double_blocks, node.sizes.single_blocks, node.sizes.head_dim) \
        == (cli.sizes.cross_attention_dim, cli.sizes.double_blocks, cli.sizes.single_blocks, cli.sizes.head_dim)
    adapter = _xlabs_adapter(cli, seed=6)
    scenes, captions = _scenes(2, seed=8)
    hidden, pooled = FluxTextCache(parts)(captions)
    clip = torch.randn(2, 768, generator=torch.Generator().manual_seed(9))
    batch = Batch(encode_images(parts["vae"], world.render(scenes)), TextCondition(hidden, {"pooled": pooled}), clip)
    try:
        loss_node, grads_node = _step(node, adapter, batch, cli.schedule)
        loss_cli, grads_cli = _step(cli, adapter, batch, cli.schedule)
    finally:
        cli.detach()
    print(f"toy Flux XLabs step: loss node {loss_node:.6f}, command line {loss_cli:.6f}, max gradient difference "
          f"{max(float((grads_node[n] - g).abs().max()) for n, g in grads_cli.items()):.2e}")
    assert abs(loss_node - loss_cli) <= 1e-5 * max(1.0, abs(loss_cli)), (loss_node, loss_cli)
    assert grads_node.keys() == grads_cli.keys() == {n for n, _ in adapter.named_parameters()}
    for name, g in grads_cli.items():
        torch.testing.assert_close(grads_node[name], g, atol=1e-5, rtol=1e-5, msg=name)
    assert max(float(g.abs().max()) for g in grads_cli.values()) > 1e-4


def comfy_sample(comfy, parts, patcher, captions, seed: int) -> torch.Tensor:
    """Text-only sampling through ComfyUI's own sampler (euler, "simple" schedule, 20 steps, cfg 3) from the
    noise `sample_flux` draws -> images [B, 3, 32, 32] in [0, 1]."""
    import comfy.sample

    text = FluxTextCache(parts)
    hidden, pooled = text(captions)
    empty_hidden, empty_pooled = text([""])
    positive = [[hidden, {"pooled_output": pooled}]]  # one entry, a row per prompt
    negative = [[empty_hidden, {"pooled_output": empty_pooled}]]
    latent = torch.zeros(len(captions), parts["vae"].config.latent_channels, LATENT_SIDE, LATENT_SIDE)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = comfy.sample.sample(patcher, noise, 20, 3.0, "euler", "simple", positive, negative, latent,
                                disable_pbar=True, seed=seed)
    return decode_latents(parts["vae"], x.float())


def test_comfy_sampler_equals_the_toys_sampler(comfy, toy):
    """ComfyUI's "simple" schedule of the model is the toy's sigma grid (its shift), and ComfyUI's euler + CFG
    (conditioning, noise scaling, denoised) gives the images of `sample_flux`."""
    import comfy.samplers

    parts, patcher, _ = toy
    grid = SCHEDULE.sampling_sigmas(20, torch.zeros(1, 1, LATENT_SIDE, LATENT_SIDE))
    theirs_grid = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", 20)
    assert (theirs_grid - grid).abs().max() < 1e-6
    _, captions = _scenes(3, seed=11)
    ours = comfy_sample(comfy, parts, patcher, captions, seed=12)
    theirs = sample_flux(parts, captions, seed=12, steps=20, guidance=3.0)
    diff = (ours - theirs).abs().max().item()
    print(f"toy Flux sampling, ComfyUI vs sample_flux: max |diff| {diff:.2e}")
    assert diff < TOL


def test_pretrained_toy_samples_the_prompts_colour_in_comfy(comfy, toy, toy_file):
    """With ComfyUI's own schedule: the oracle reads the prompt's colour in >= 80 % of 16 samples."""
    from ipa_train.toy.oracle import accuracy, read_batch

    if toy_file != SHIPPED_FLUX:
        pytest.skip(f"{SHIPPED_FLUX.name} is not built yet or this is the random pixel-VAE file (python scripts/build_toy_model.py --family flux): "
                    "sampling needs the pretrained toy Flux")
    parts, patcher, _ = toy
    scenes, captions = _scenes(16, seed=1234)
    images = comfy_sample(comfy, parts, patcher, captions, seed=1234)
    colour = accuracy(read_batch(images), [s.colour for s in scenes], "colour")
    print(f"toy Flux in ComfyUI, text-only colour accuracy {colour:.2f} over 16 samples")
    assert colour >= 0.8
