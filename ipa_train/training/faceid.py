"""FaceID training pieces: the face-embedding dataset and the LoRA trained on every attention layer.

As tencent's `tutorial_train_faceid.py`: the tokens come from the (L2-normalised) ArcFace embedding of the image's
face, a dropped image is a zero embedding, and besides the projection and the image K/V a LoRA (rank 128 by
default) trains on the to_q/to_k/to_v/to_out of every attention processor of the UNet, self-attention included.
The LoRA is kept under the official FaceID keys `{i}.to_{q,k,v,out}_lora.{down,up}.weight` (i = attention processor
in diffusers order, 2k the self-attention and 2k+1 the cross-attention of cross-attention layer k), so the
exported file has the h94 layout.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..adapter.config import AdapterConfig
from ..adapter.faceid import FACE_EMBEDDING_DIM
from ..adapter.modules import IPAdapter
from ..errors import FaceError, TrainConfigError
from .backbone import BackboneSizes
from .data import CaptionedImages, DatasetInfo, clip_pixels
from .face_cache import CACHE_NAME, FaceCache, cached_face_embeddings

logger = logging.getLogger(__name__)

PROJS = ("q", "k", "v", "out")
DEFAULT_PACK = "buffalo_l"


class LoRALinear(nn.Module):
    """`up(down(x))`, down [r, in] and up [out, r], no alpha: the term a FaceID file adds to a linear layer.
    Initialised as diffusers' LoRALinearLayer (down ~ N(0, 1/r), up = 0), so training starts at the base model."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.down.weight, std=1.0 / rank)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype)))


def lora_shapes(sizes: BackboneSizes) -> list[dict[str, tuple[int, int]]]:
    """(in, out) of q/k/v/out per attention processor: processor 2k is the self-attention of cross-attention layer k
    (width h both ways), 2k+1 its cross-attention (k and v read the text width C)."""
    c = int(sizes.cross_attention_dim)
    out: list[dict[str, tuple[int, int]]] = []
    for h in sizes.layer_hidden_sizes:
        out.append({p: (h, h) for p in PROJS})
        out.append({"q": (h, h), "k": (c, h), "v": (c, h), "out": (h, h)})
    return out


class FaceLoRA(nn.Module):
    """The LoRA of every attention processor; `state_dict()` keys are the official `{i}.to_q_lora.down.weight`."""

    def __init__(self, shapes: list[dict[str, tuple[int, int]]], rank: int):
        super().__init__()
        self.rank = rank
        self.processors = nn.ModuleList(
            nn.ModuleDict({f"to_{p}_lora": LoRALinear(*shape[p], rank) for p in PROJS}) for shape in shapes)

    def layer(self, processor: int, proj: str) -> LoRALinear:
        return self.processors[processor][f"to_{proj}_lora"]  # type: ignore[index, return-value]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live parameters under the official keys (what `IPAdapter.lora` holds and `save_adapter` writes)."""
        return {k[len("processors."):]: v for k, v in self.state_dict(keep_vars=True).items()}

    def load(self, lora: dict[str, torch.Tensor], what: str) -> None:
        """Copy an adapter file's LoRA in (fine-tuning, resuming); one line when it does not fit."""
        mine = self.tensors()
        if set(lora) != set(mine) or any(lora[k].shape != mine[k].shape for k in mine):
            theirs = next(iter(lora.values())).shape[0] if lora else 0
            raise FaceError(f"{what}: its FaceID LoRA (rank {theirs}, {len(lora)} matrices) does not fit the one being "
                            f"trained (rank {self.rank}, {len(mine)} matrices); set --lora-rank {theirs or self.rank}")
        with torch.no_grad():
            for k, p in mine.items():
                p.copy_(lora[k].to(p))


def hook_lora(attentions: list, lora: FaceLoRA, names: list[str]) -> list:
    """Add `lora.layer(i, p)(x)` to the output of to_p (to_out[0] for out) of attention module i (in processor
    order), with forward hooks: the attention code stays the host's, and an IP-Adapter patch on attn2 adds its
    image branch before to_out, as tencent's LoRAIPAttnProcessor does. Returns the handles (`.remove()`)."""
    if len(attentions) != len(lora.processors):
        raise FaceError(f"the FaceID LoRA has {len(lora.processors)} attention processors, this model "
                        f"{len(attentions)}; the adapter is for another base model")
    handles = []
    for i, (attn, name) in enumerate(zip(attentions, names)):
        for proj, linear in (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v), ("out", attn.to_out[0])):
            term = lora.layer(i, proj)
            if (term.down.in_features, term.up.out_features) != (linear.in_features, linear.out_features):
                raise FaceError(f"{name}.to_{proj} is [{linear.out_features}, {linear.in_features}] but the FaceID "
                                f"LoRA's is [{term.up.out_features}, {term.down.in_features}]; the adapter is for "
                                "another base model")
            handles.append(linear.register_forward_hook(
                lambda _m, args, out, term=term: out + term(args[0]).to(out.dtype)))
    return handles


# --------------------------------------------------------------------------------------------------------
# The dataset: images with a face, their cached embeddings and aligned crops


class FaceImages(CaptionedImages):
    """The images of a dataset in which a face was found, with their normalised face embeddings [N, 512] and, for
    the plus variants, the aligned face crop as the CLIP input (the target stays the whole image)."""

    def __init__(self, base: CaptionedImages, cache: FaceCache, skipped: list[str]):
        rows = cache.index()
        keep = [s for s in base.samples if str(s.path) in rows]
        info = DatasetInfo(base.info.source, base.info.root, len(keep), sum(s.has_caption for s in keep),
                           list(base.info.skipped) + skipped)
        super().__init__(keep, info, base.resolution, base.random_crop, base.random_flip)
        order = [rows[str(s.path)] for s in keep]
        self.faces = cache.normed()[order]  # [N, 512]
        self.crops = cache.crops[order] if cache.crops is not None else None  # [N, S, S, 3] uint8

    def face(self, index: int) -> torch.Tensor:
        return self.faces[index]

    def clip_input(self, index: int) -> torch.Tensor:
        if self.crops is None:
            return super().clip_input(index)
        return clip_pixels(Image.fromarray(np.asarray(self.crops[index])))


def face_model_folder(path: str | os.PathLike | None) -> Path:
    """The folder holding the face ONNX files: `path` itself, or `path/models/buffalo_l` (the insightface root)."""
    from ..face.models import PACKS, find_model_folder

    if not path:
        files, page = PACKS[DEFAULT_PACK]
        raise FaceError(f"FaceID training needs the face models: give --face-models, the folder with {files} (ComfyUI "
                        f"keeps them in models/insightface/models/{DEFAULT_PACK}; download from {page})")
    folder = Path(path)
    if folder.is_dir() and any(folder.glob("*.onnx")):
        return folder
    if not folder.is_dir():
        files, page = PACKS[DEFAULT_PACK]
        raise FaceError(f"face models folder {folder} does not exist; put {files} there (download from {page}; the "
                        "models are for non-commercial research only)")
    return find_model_folder(folder, DEFAULT_PACK)


def open_face_models(path: str | os.PathLike | None, provider: str = "auto", pick: str = "score"):
    """A FaceAnalyzer over the folder's detector and recognizer; one FaceError for each thing missing."""
    from ..face import FaceAnalyzer, FaceModels
    from ..face.runtime import ort

    ort()  # onnxruntime first: without it nothing below can be checked
    return FaceAnalyzer(FaceModels(face_model_folder(path), provider), pick=pick)


def face_dataset(dataset: CaptionedImages, analyzer, output_dir: str | os.PathLike, crop_size: int = 0) -> FaceImages:
    """The dataset's images with a face, their embeddings computed once (or read from OUTPUT/face_embeds.safetensors
    when it was made from the same files with the same models) and cached as safetensors."""
    cache, skipped = cached_face_embeddings([s.path for s in dataset.samples], analyzer,
                                            Path(output_dir) / CACHE_NAME, crop_size or None)
    out = FaceImages(dataset, cache, skipped)
    logger.info("FaceID dataset: %d of %d images have a face", len(out), len(dataset))
    return out


# --------------------------------------------------------------------------------------------------------
# The adapter and its LoRA


def face_adapter_config(config, sizes: BackboneSizes) -> AdapterConfig:
    """The FaceID adapter a from-scratch run trains: 4 tokens from the 512-wide face embedding (faceid), the plus
    variants' perceiver over the crop's penultimate CLIP states, and the LoRA's rank."""
    plus = config.face_crop > 0
    return AdapterConfig(
        projection=config.projection, num_tokens=config.tokens,
        clip_embedding_dim=sizes.clip_embedding_dim("penultimate") if plus else FACE_EMBEDDING_DIM,
        cross_attention_dim=int(sizes.cross_attention_dim), layer_hidden_sizes=tuple(sizes.layer_hidden_sizes),
        clip_output=config.clip_output, fusion=config.fusion, face_embedding_dim=FACE_EMBEDDING_DIM,
        lora_rank=config.lora_rank)


def lora_parameters(config: AdapterConfig, sizes: BackboneSizes) -> int:
    """How many values the adapter's LoRA holds (0 without one)."""
    if not config.is_faceid or not config.lora_rank:
        return 0
    return sum(config.lora_rank * (i + o) for shape in lora_shapes(sizes) for i, o in shape.values())


def attach_face_lora(backbone, adapter: IPAdapter, device: torch.device, what: str) -> FaceLoRA | None:
    """A FaceID adapter's LoRA, as trainable parameters: built new (or from the fine-tuned file's), installed on
    the backbone's attention layers, and put in `adapter.lora` so that checkpoints and the export write it."""
    c = adapter.config
    if not c.is_faceid or not c.lora_rank:
        return None
    attach = getattr(backbone, "attach_lora", None)
    if attach is None:
        raise TrainConfigError(f"this base model ({type(backbone).__name__}) cannot train the LoRA of a FaceID "
                               "adapter; train FaceID with the command line")
    lora = FaceLoRA(lora_shapes(backbone.sizes), c.lora_rank)
    if adapter.lora:
        lora.load(adapter.lora, what)
    lora.to(device).train()
    adapter.lora = lora.tensors()
    attach(lora)
    return lora
