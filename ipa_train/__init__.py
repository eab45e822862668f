"""ipa_train: the host-free core of ComfyUI IP-Adapter Kit (modules, weight formats, attention, training)."""

from .adapter.config import AdapterConfig, ResamplerConfig
from .adapter.formats import (
    convert_checkpoint,
    detect_config,
    inspect_file,
    load_adapter,
    read_adapter_state,
    save_adapter,
)
from .adapter.modules import IPAdapter, TextImageFusion
from .errors import AdapterFormatError, BaseModelMismatchError, DatasetError, EncoderMismatchError, IPAKitError

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "AdapterFormatError",
    "BaseModelMismatchError",
    "DatasetError",
    "EncoderMismatchError",
    "IPAKitError",
    "IPAdapter",
    "ResamplerConfig",
    "TextImageFusion",
    "convert_checkpoint",
    "detect_config",
    "inspect_file",
    "load_adapter",
    "read_adapter_state",
    "save_adapter",
]
