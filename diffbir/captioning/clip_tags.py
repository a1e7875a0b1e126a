"""``clip-tags``: an open_clip zero-shot tagger over a fixed vocabulary of ours.

Not the official ``ram`` (Recognize Anything Plus, which this package cannot provide: see
:data:`diffbir.captioning.registry.RAM_UNAVAILABLE`) and not a stand-in for it: a different
model with different tags, under its own name. Each vocabulary entry is embedded once as
``"a photo of a {tag}."``; an image gets the tags whose softmax probability over the vocabulary
(CLIP's logit scale) is at least ``min_probability``, at most ``max_tags``, most probable
first, joined with ``", "`` as the official run joins RAM's tags.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffbir.captioning.base import Captioner, require_packages
from diffbir.captioning.hub import HubModel, resolve_model_folder

CLIP_TAGS = HubModel(
    captioner="clip-tags",
    repo_id="laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    use="open_clip ViT-B/32 trained on LAION-2B, about 600 MB",
    allow_patterns=("open_clip_config.json", "open_clip_model.safetensors"),
    required=("open_clip_config.json", "open_clip_model.safetensors"),
)

TEMPLATE = "a photo of a {}."
VOCABULARY = (
    "person", "man", "woman", "child", "baby", "face", "portrait", "group of people", "crowd",
    "dog", "cat", "bird", "horse", "cow", "sheep", "fish", "insect", "butterfly", "flower",
    "tree", "forest", "grass", "leaves", "plant", "garden", "field", "farm", "mountain", "hill",
    "rock", "desert", "beach", "sea", "ocean", "wave", "lake", "river", "waterfall", "snow",
    "ice", "sky", "cloud", "sunset", "night", "moon", "street", "road", "bridge", "city",
    "building", "skyscraper", "house", "church", "temple", "castle", "tower", "window", "door",
    "wall", "roof", "room", "kitchen", "bedroom", "office", "shop", "market", "restaurant",
    "table", "chair", "sofa", "bed", "lamp", "book", "painting", "poster", "text", "sign",
    "car", "bus", "truck", "bicycle", "motorcycle", "train", "boat", "ship", "airplane",
    "food", "fruit", "vegetable", "cake", "bread", "drink", "cup", "bottle", "plate", "toy",
    "dress", "shirt", "hat", "glasses", "shoe", "bag", "jewelry", "uniform", "soldier",
    "wedding", "statue", "sculpture", "fabric", "wood", "metal", "stone", "glass", "brick",
    "black and white photo", "old photo", "close-up", "landscape", "cartoon", "drawing",
)  # fmt: skip


def check_clip_tags(
    model: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The package and the model folder with every file, checked without loading; returns
    the folder."""
    require_packages("open_clip")
    return resolve_model_folder(model, CLIP_TAGS, cache_dir=cache_dir)


class ClipTagger(Captioner):
    """Zero-shot tags from an open_clip model (see the module docstring)."""

    name = "clip-tags"

    def __init__(
        self,
        model: str | os.PathLike = CLIP_TAGS.repo_id,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 1,
        cache_dir: str | os.PathLike | None = None,
        vocabulary: tuple[str, ...] = VOCABULARY,
        max_tags: int = 5,
        min_probability: float = 0.05,
    ) -> None:
        super().__init__(batch_size)
        folder = check_clip_tags(model, cache_dir=cache_dir)
        import open_clip

        self.device = torch.device(device)
        self.model, self.preprocess = open_clip.create_model_from_pretrained(
            f"local-dir:{folder}", device=self.device
        )
        self.model.eval()
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        self.vocabulary = vocabulary
        self.max_tags = max_tags
        self.min_probability = min_probability
        with torch.inference_mode():
            text = self.model.encode_text(
                tokenizer([TEMPLATE.format(t) for t in vocabulary]).to(self.device)
            )
            self.text_features = text / text.norm(dim=-1, keepdim=True)

    def probabilities(self, images: list[np.ndarray]) -> torch.Tensor:
        """(batch, vocabulary) softmax probabilities of the vocabulary entries."""
        pixels = torch.stack([self.preprocess(Image.fromarray(im)) for im in images])
        with torch.inference_mode():
            feats = self.model.encode_image(pixels.to(self.device))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            logits = self.model.logit_scale.exp() * feats @ self.text_features.T
        return logits.softmax(dim=-1).cpu()

    def _caption_batch(self, images: list[np.ndarray]) -> list[str]:
        captions = []
        for probs in self.probabilities(images):
            top = probs.topk(min(self.max_tags, len(self.vocabulary)))
            tags = [
                self.vocabulary[i]
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                if p >= self.min_probability
            ]
            captions.append(", ".join(tags))
        return captions

    def _release(self) -> None:
        del self.model, self.preprocess, self.text_features
