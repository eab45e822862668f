"""Backward, optimizer step, autocast and processes, with or without accelerate."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn

from .config import TrainConfig

logger = logging.getLogger(__name__)

# Devices, precision and processes


# A conv weight this large makes oneDNN's per-call re-layout copy matter for peak memory (see `Engine.kernels`).
NATIVE_CONV_BYTES = 16 * 2**20


def largest_conv_bytes(module: nn.Module | None) -> int | None:
    """Bytes of the largest convolution weight under `module` (None when unknown)."""
    if module is None:
        return None
    sizes = [m.weight.numel() * m.weight.element_size() for m in module.modules()
             if isinstance(m, nn.modules.conv._ConvNd) and getattr(m, "weight", None) is not None]
    return max(sizes, default=0)


@contextlib.contextmanager
def _native_convolutions():
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


MIXED_PRECISION_DEVICES = ("cuda",)  # fp16 / bf16 autocast only where it is faster than fp32 (tests add "cpu")


class Engine:
    """Backward, optimizer step, autocast and process handling, through accelerate when it is given.

    Without an accelerator: one process, autocast and a GradScaler (fp16) on CUDA only.
    """

    def __init__(self, config: TrainConfig, device: torch.device, accelerator: Any = None):
        self.accelerator = accelerator
        self.device = torch.device(accelerator.device) if accelerator is not None else device
        precision = config.mixed_precision
        if precision != "no" and self.device.type not in MIXED_PRECISION_DEVICES:
            logger.warning("mixed_precision=%s needs a GPU; training on %s in fp32", precision, self.device.type)
            precision = "no"
        self.precision = precision
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.scaler = None
        if accelerator is None and precision == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")
        self.max_grad_norm = config.max_grad_norm

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def world(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, Any]:
        if self.accelerator is None:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.accelerator is not None:
            return self.accelerator.autocast()
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def kernels(self, largest_conv_bytes: int | None = None) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward. On CPU, with a denoiser whose largest conv weight is at least
        `NATIVE_CONV_BYTES` (or unknown: None), ATen's own convolution instead of oneDNN's: oneDNN reorders a frozen
        conv weight into its blocked layout on every call, forward and backward, a transient copy as large as the
        biggest weight (118 MB for SD1.5's 2560->1280 3x3 conv) on top of all the step holds, while the native kernel
        reads the weights in place and is no slower at those sizes. Small convolutions (the toy model's, under 1 MB)
        keep oneDNN, which is about 1.8x faster there and whose copies are negligible."""
        if self.device.type != "cpu" or (largest_conv_bytes is not None and largest_conv_bytes < NATIVE_CONV_BYTES):
            return contextlib.nullcontext()
        return _native_convolutions()

    def sync(self, model: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if self.accelerator is None or last_micro_batch:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self, optimizer: Any, params: list[nn.Parameter]) -> None:
        if self.max_grad_norm > 0:
            if self.accelerator is not None:
                self.accelerator.clip_grad_norm_(params, self.max_grad_norm)
            else:
                if self.scaler is not None:
                    self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device)
        return float(self.accelerator.reduce(t, reduction="mean").item())

    def scaler_state(self) -> dict[str, Any] | None:
        scaler = self.scaler if self.accelerator is None else getattr(self.accelerator, "scaler", None)
        return scaler.state_dict() if scaler is not None else None

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        scaler = self.scaler if self.accelerator is None else getattr(self.accelerator, "scaler", None)
        if scaler is not None and state:
            scaler.load_state_dict(state)

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

