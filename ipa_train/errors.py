"""Exceptions raised to users. Every message names the file or value, what was expected, what was found, and a fix."""

from __future__ import annotations


class IPAKitError(ValueError):
    """Base class for every user-facing error of the kit."""


class AdapterFormatError(IPAKitError):
    """A weight file is not an IP-Adapter this kit can use (wrong layout, truncated, unsupported variant)."""


class EncoderMismatchError(IPAKitError):
    """The CLIP vision output given to an adapter does not fit its projection model."""


class BaseModelMismatchError(IPAKitError):
    """An adapter does not fit the base model it is applied to (e.g. an SDXL adapter on an SD1.5 UNet)."""


class DatasetError(IPAKitError):
    """A training dataset is missing, empty, or malformed."""


class TrainConfigError(IPAKitError):
    """A training option is out of range or contradicts another option or a checkpoint."""


class EvaluationError(IPAKitError):
    """An evaluation input (CLIP model, image, sweep setting, report file) is missing or unusable."""


class FaceError(IPAKitError):
    """The face pipeline cannot run (onnxruntime or face models missing) or found no usable face."""
