"""ComfyUI patch modules, one per patch point, host-free: they receive ComfyUI's block arguments and the block
modules and never import ComfyUI. `flux.py`: Flux double/single blocks; `mmdit.py`: SD3 joint blocks; `dit.py`: what
both share (the applied adapter, its tokens per cond/uncond row, the sigma window, chaining)."""
