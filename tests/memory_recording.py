"""A training backbone's loads and releases, recorded, and the memory order they must show.

`Recording` goes in front of a backbone class (`DiffusersBackbone`, `DitBackbone`): it logs ("load", name, alive)
before each real load (meta-device builds for sizes are not loads), ("release", parts, alive) after each release
and ("call", method, alive) for the methods that need the denoiser; `alive` = the loaded modules still in memory
(weak references, after a garbage collection). `check_order` reads such a log.
"""

from __future__ import annotations

import gc
import weakref

from torch import nn

UNET_ENCODERS = ("vae", "text_encoder", "image_encoder")
DIT_ENCODERS = {"flux": ("vae", "text_encoder", "text_encoder_2", "image_encoder"),  # CLIP-L, T5
                "sd3": ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "image_encoder")}  # CLIP-L, G, T5
DENOISER_CALLS = ("init_adapter", "attach", "predict", "enable_gradient_checkpointing")


class Recording:
    """Mixin recording a backbone's loads, releases and denoiser calls in `events`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A full collection scans the whole session's heap (most of a second with torch, diffusers and transformers
        # imported): objects older than this backbone are moved out of its scans until the backbone is gone. The
        # models load later, so a released one is still collected.
        gc.collect()
        gc.freeze()
        weakref.finalize(self, gc.unfreeze)
        self.events: list[tuple[str, str, list[str]]] = []
        self._refs: dict[str, weakref.ref] = {}
        for name, load in list(self._loaders.items()):
            self._loaders[name] = self._recorded(name, load)

    def _recorded(self, name, load):
        def wrapped():
            self.events.append(("load", name, self.alive()))
            module = load()
            if isinstance(module, nn.Module):
                self._refs[name] = weakref.ref(module)
            return module

        return wrapped

    def alive(self) -> list[str]:
        gc.collect()
        return sorted(n for n, ref in self._refs.items() if ref() is not None)

    def release(self, parts):
        super().release(parts)
        self.events.append(("release", "/".join(parts), self.alive()))

    def init_adapter(self, adapter):
        self.events.append(("call", "init_adapter", self.alive()))
        super().init_adapter(adapter)

    def attach(self, adapter):
        self.events.append(("call", "attach", self.alive()))
        super().attach(adapter)

    def predict(self, noisy, timesteps, text, ip_tokens):
        out = super().predict(noisy, timesteps, text, ip_tokens)
        self.events.append(("call", "predict", self.alive()))  # after the forward: activations and all
        return out


def check_order(events: list, denoiser: str = "unet", encoders: tuple[str, ...] = UNET_ENCODERS) -> None:
    """The denoiser loads once, after every encoder was loaded, used and freed; nothing loads an encoder again."""
    loads = [name for kind, name, _ in events if kind == "load"]
    assert denoiser in loads and all(e in loads for e in encoders), loads
    first = next(i for i, (kind, name, _) in enumerate(events) if kind == "load" and name == denoiser)
    first_release = next(i for i, (kind, _, _) in enumerate(events) if kind == "release")
    assert first_release < first, events
    for kind, name, alive in events[first:]:
        assert not (kind == "load" and name in encoders), f"{name} loaded again after the {denoiser}: {events}"
        held = [e for e in encoders if e in alive]
        assert not held, f"{held} still in memory at {kind} {name} (after the {denoiser} loaded): {events}"
    calls = [i for i, (kind, name, _) in enumerate(events) if kind == "call" and name in DENOISER_CALLS]
    assert calls and min(calls) > first_release, events  # the protocol's order, whatever the backbone
    predicts = [alive for kind, name, alive in events if kind == "call" and name == "predict"]
    assert predicts and all(denoiser in alive for alive in predicts)
