"""Host integrations: the ComfyUI attention patch, the diffusers UNet patch and the diffusers training backbone."""
