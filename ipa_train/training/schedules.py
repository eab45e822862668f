"""Noise schedules of training as objects: what a step samples, how it noises the latents and what it targets.

- `DDPMSchedule`: the UNet families (epsilon or v-prediction over a discrete DDPM schedule), read from the
  backbone's own `add_noise` / `target` / `num_train_timesteps`, so their losses stay what they were.
- `FlowMatchSchedule`: Flux and SD3.5 (rectified flow). A step draws sigma in (0, 1) per sample, noises
  x_t = (1 - sigma) x0 + sigma * noise and targets the velocity noise - x0. sigma = shift(u) with
  u = sigmoid(N(mean, std)) (logit-normal, as SD3's and Flux's published fine-tuning scripts) or uniform, and
  shift(u) = s u / (1 + (s - 1) u): s fixed (SD3: 3.0, the scheduler's `shift`) or s = exp(mu) with mu linear in
  the image's token count (Flux: 0.5 at 256 tokens to 1.15 at 4096, the resolution-dependent shift of its
  scheduler config).

`_loss` draws the noise first, then `schedule.sample(latents)`, both from torch's global CPU generator (the same
draws on every device: resume is bit-equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from ..errors import TrainConfigError


class NoiseSchedule(Protocol):
    kind: str  # "ddpm" | "flow"

    def sample(self, latents: torch.Tensor) -> torch.Tensor:
        """Per-sample timesteps for a batch of clean latents [B, c, h, w]: DDPM indices [B] (long) or sigmas [B]
        (float, in (0, 1)), on CPU."""
        ...

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ...


class DDPMSchedule:
    """The backbone's DDPM schedule: uniform integer timesteps, its `add_noise` and `target` (eps or v)."""

    kind = "ddpm"

    def __init__(self, backbone: Any):
        self.backbone = backbone

    def sample(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.randint(0, self.backbone.num_train_timesteps, (latents.shape[0],))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.backbone.add_noise(latents, noise, t)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.backbone.target(latents, noise, t)


@dataclass(frozen=True)
class DynamicShift:
    """Flux's resolution-dependent shift: mu linear in the image token count (latent h/2 * w/2), s = exp(mu)."""

    base_tokens: int = 256
    max_tokens: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    patch: int = 2  # latent pixels per token side

    def shift(self, latents: torch.Tensor) -> float:
        tokens = (latents.shape[-2] // self.patch) * (latents.shape[-1] // self.patch)
        slope = (self.max_shift - self.base_shift) / (self.max_tokens - self.base_tokens)
        return math.exp(self.base_shift + slope * (tokens - self.base_tokens))


TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Rectified-flow training schedule (see the module docstring). `shift` > 0 is a fixed shift; 0 uses
    `dynamic` (Flux) or no shift when `dynamic` is None."""

    sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    dynamic: DynamicShift | None = None
    kind: str = "flow"

    def shift_for(self, latents: torch.Tensor) -> float:
        if self.shift > 0:
            return self.shift
        return self.dynamic.shift(latents) if self.dynamic is not None else 1.0

    def sample(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n = latents.shape[0]
        if self.sampling == "uniform":
            u = torch.rand(n, generator=generator)
        else:
            u = torch.sigmoid(torch.randn(n, generator=generator) * self.logit_std + self.logit_mean)
        s = self.shift_for(latents)
        return s * u / (1 + (s - 1) * u)  # [B] sigmas in (0, 1)

    def sampling_sigmas(self, steps: int, latents: torch.Tensor) -> torch.Tensor:
        """An Euler sampler's sigma grid [steps + 1] from 1 to 0, shifted as training draws them."""
        s = self.shift_for(latents)
        u = torch.linspace(1.0, 0.0, steps + 1)
        return s * u / (1 + (s - 1) * u)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = t.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - latents


def schedule_for(backbone: Any, config: Any) -> NoiseSchedule:
    """The schedule a run trains with: the backbone's `schedule` (flow matching, family defaults) with the run's
    options applied, or the DDPM schedule of a UNet backbone (which has no `schedule` attribute)."""
    base = getattr(backbone, "schedule", None)
    if base is None or getattr(base, "kind", "ddpm") != "flow":
        return DDPMSchedule(backbone)
    changes: dict[str, Any] = {"logit_mean": config.logit_mean, "logit_std": config.logit_std}
    if config.timestep_sampling != "auto":
        if config.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise TrainConfigError(f"training option: timestep_sampling must be auto, {', '.join(TIMESTEP_SAMPLINGS)}; "
                                   f"got {config.timestep_sampling!r}")
        changes["sampling"] = config.timestep_sampling
    if config.flow_shift > 0:
        changes["shift"] = config.flow_shift
    return replace(base, **changes)
