"""ComfyUI node layer (V3 schema): translates ComfyUI types into `ipa_train` calls. No math lives here.

Importing this package needs ComfyUI (`comfy_api`); the pack's `__init__.py` imports it only from `comfy_entrypoint`.
"""

from comfy_api.latest import ComfyExtension, io

from .apply import IPAKitApply, IPAKitApplySimple, IPAKitEncodeImage
from .embeds import IPAKitLoadEmbeds, IPAKitSaveEmbeds
from .evaluate import IPAKitEvaluate, IPAKitWeightSweep
from .faceid import IPAKitEncodeFace, IPAKitLoadFaceModels
from .frames import IPAKitEncodeFrames, IPAKitWeightSchedule
from .loaders import IPAKitLoadAdapter
from .presets import IPAKitPresetLoader
from .reference import IPAKitNoiseImage, IPAKitPrepImage
from .regions import IPAKitRegion
from .style_composition import IPAKitApplyStyleComposition
from .tiles import IPAKitApplyTiled
from .train import IPAKitDataset, IPAKitTrain

NODES: list[type[io.ComfyNode]] = [
    IPAKitLoadAdapter,
    IPAKitEncodeImage,
    IPAKitApply,
    IPAKitApplySimple,
    IPAKitApplyStyleComposition,
    IPAKitDataset,
    IPAKitTrain,
    IPAKitEvaluate,
    IPAKitWeightSweep,
    # reference preparation, animation batches, embeds files, presets, regions, tiles
    IPAKitPresetLoader,
    IPAKitPrepImage,
    IPAKitNoiseImage,
    IPAKitEncodeFrames,
    IPAKitWeightSchedule,
    IPAKitSaveEmbeds,
    IPAKitLoadEmbeds,
    IPAKitRegion,
    IPAKitApplyTiled,
    IPAKitLoadFaceModels,
    IPAKitEncodeFace,
]


class IPAKitExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


__all__ = ["NODES", "IPAKitExtension"]
