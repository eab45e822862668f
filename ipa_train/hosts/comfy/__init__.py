"""ComfyUI patch modules, one per patch point, host-free: they receive ComfyUI's block arguments and the block
modules and never import ComfyUI. `unet.py`: SD1.5/SDXL cross-attention (attn2 replacement); `flux.py`: Flux
double/single blocks; `mmdit.py`: SD3 joint blocks; `dit.py`: what the DiT ones share (the applied adapter, its
tokens per cond/uncond row, the sigma window, chaining)."""
