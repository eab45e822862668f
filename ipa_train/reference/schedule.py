"""Per-frame weight schedules for animation batches: one weight per latent frame."""

from __future__ import annotations

from ..errors import IPAKitError

CURVES = ("linear", "ease_in", "ease_out", "ease_in_out", "custom")


def ease(curve: str, t: float) -> float:
    """Progress 0..1 -> 0..1 along `curve` (quadratic ease in/out; smoothstep for in-out)."""
    if curve == "linear":
        return t
    if curve == "ease_in":
        return t * t
    if curve == "ease_out":
        return 1 - (1 - t) * (1 - t)
    if curve == "ease_in_out":
        return t * t * (3 - 2 * t)
    raise IPAKitError(f"schedule curve {curve!r} is not one of {', '.join(CURVES)}")


def parse_custom(text: str) -> list[float]:
    """"0, 0.5, 1" -> [0.0, 0.5, 1.0]; one clear error naming the bad entry."""
    values = []
    for part in text.replace(";", ",").replace("\n", ",").split(","):
        if part.strip():
            try:
                values.append(float(part))
            except ValueError:
                raise IPAKitError(f"custom schedule entry {part.strip()!r} is not a number; write e.g. '0, 0.5, 1'") from None
    if not values:
        raise IPAKitError("custom schedule is empty; write comma-separated weights, e.g. '0, 0.5, 1'")
    return values


def weight_schedule(frames: int, curve: str = "linear", start_weight: float = 0.0, end_weight: float = 1.0,
                    start_frame: int = 0, end_frame: int = -1, custom: str = "") -> list[float]:
    """`frames` weights: start_weight up to start_frame, the curve between, end_weight from end_frame on.

    end_frame -1 means the last frame. "custom" spreads the listed values evenly over start_frame..end_frame and
    interpolates linearly between them (so "0, 1" equals linear from 0 to 1; one value is a constant).
    """
    if frames < 1:
        raise IPAKitError(f"schedule needs at least 1 frame, got {frames}")
    end = frames - 1 if end_frame < 0 else min(end_frame, frames - 1)
    start = min(max(0, start_frame), end)
    points = parse_custom(custom) if curve == "custom" else None
    out = []
    for f in range(frames):
        t = 0.0 if end == start else min(1.0, max(0.0, (f - start) / (end - start)))
        if points is None:
            out.append(start_weight + (end_weight - start_weight) * ease(curve, t))
            continue
        pos = t * (len(points) - 1)
        i = min(int(pos), len(points) - 2) if len(points) > 1 else 0
        frac = pos - i
        out.append(points[i] if len(points) == 1 else points[i] * (1 - frac) + points[i + 1] * frac)
    return out
