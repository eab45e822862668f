"""Training noise schedules as objects: flow matching's sigma draws and shifts, the options a run applies, and
the DDPM schedule drawing exactly what the UNet loop drew before."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ipa_train.training.config import TrainConfig
from ipa_train.training.schedules import DDPMSchedule, DynamicShift, FlowMatchSchedule, schedule_for


def test_flow_matching_noises_and_targets_the_velocity():
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    s = FlowMatchSchedule()
    xt = s.add_noise(x0, noise, sigma)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[2], noise[2])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(s.target(x0, noise, sigma), noise - x0)


@pytest.mark.parametrize("side, mu", [(32, 0.5), (128, 1.15), (64, 0.5 + 0.65 * (1024 - 256) / 3840)])
def test_flux_shift_follows_the_image_token_count(side, mu):
    latents = torch.zeros(1, 16, side, side)  # side/2 squared tokens: 256, 4096, 1024
    assert math.isclose(DynamicShift().shift(latents), math.exp(mu), rel_tol=1e-12)


def test_logit_normal_draw_with_a_fixed_shift():
    torch.manual_seed(0)
    sigma = FlowMatchSchedule(shift=3.0).sample(torch.zeros(4000, 1, 2, 2))
    torch.manual_seed(0)
    u = torch.sigmoid(torch.randn(4000))
    assert torch.allclose(sigma, 3 * u / (1 + 2 * u))
    assert 0 < float(sigma.min()) and float(sigma.max()) < 1 and float(sigma.median()) == pytest.approx(0.75, abs=0.02)


def test_run_options_apply_to_the_backbone_schedule():
    backbone = SimpleNamespace(schedule=FlowMatchSchedule(shift=0.0, dynamic=DynamicShift()))
    s = schedule_for(backbone, TrainConfig(timestep_sampling="uniform", flow_shift=2.0, logit_std=0.5))
    assert (s.sampling, s.shift, s.logit_std, s.dynamic) == ("uniform", 2.0, 0.5, DynamicShift())
    torch.manual_seed(1)
    sigma = s.sample(torch.zeros(5, 1, 2, 2))
    torch.manual_seed(1)
    u = torch.rand(5)
    assert torch.allclose(sigma, 2 * u / (1 + u))
    assert schedule_for(backbone, TrainConfig()).shift == 0.0  # the family's shift unless asked


def test_ddpm_schedule_draws_what_the_unet_loop_drew():
    backbone = SimpleNamespace(num_train_timesteps=1000, add_noise=lambda x, n, t: x + n, target=lambda x, n, t: n)
    s = schedule_for(backbone, TrainConfig())
    assert isinstance(s, DDPMSchedule)
    torch.manual_seed(3)
    t = s.sample(torch.zeros(6, 4, 2, 2))
    torch.manual_seed(3)
    assert torch.equal(t, torch.randint(0, 1000, (6,)))
