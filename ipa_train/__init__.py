"""ipa_train: the host-free core of ComfyUI IP-Adapter Kit (modules, weight formats, attention, training)."""

from .config import AdapterConfig, ResamplerConfig
from .errors import AdapterFormatError, BaseModelMismatchError, DatasetError, EncoderMismatchError, IPAKitError
from .formats import convert_checkpoint, detect_config, inspect_file, load_adapter, read_adapter_state, save_adapter
from .modules import IPAdapter, TextImageFusion

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
