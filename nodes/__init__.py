"""ComfyUI node layer: translates ComfyUI types into `ipa_train` calls. No math lives here."""

from .apply import IPAKitApply, IPAKitApplySimple, IPAKitEncodeImage
from .common import register_folders
from .evaluate import IPAKitEvaluate, IPAKitWeightSweep
from .loaders import IPAKitLoadAdapter
from .train import IPAKitDataset, IPAKitTrain

NODE_CLASS_MAPPINGS = {
    "IPAKitLoadAdapter": IPAKitLoadAdapter,
    "IPAKitEncodeImage": IPAKitEncodeImage,
    "IPAKitApply": IPAKitApply,
    "IPAKitApplySimple": IPAKitApplySimple,
    "IPAKitDataset": IPAKitDataset,
    "IPAKitTrain": IPAKitTrain,
    "IPAKitEvaluate": IPAKitEvaluate,
    "IPAKitWeightSweep": IPAKitWeightSweep,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "IPAKitLoadAdapter": "Load IP-Adapter (Kit)",
    "IPAKitEncodeImage": "Encode Reference Image (Kit)",
    "IPAKitApply": "Apply IP-Adapter (Kit)",
    "IPAKitApplySimple": "Apply IP-Adapter Simple (Kit)",
    "IPAKitDataset": "IP-Adapter Training Dataset (Kit)",
    "IPAKitTrain": "Train IP-Adapter (Kit)",
    "IPAKitEvaluate": "Evaluate IP-Adapter Images (Kit)",
    "IPAKitWeightSweep": "IP-Adapter Weight Sweep (Kit)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "register_folders"]
