"""Host integrations: the ComfyUI patches (`comfy/`, one module per patch point), the diffusers UNet patch and
the diffusers training backbone."""
