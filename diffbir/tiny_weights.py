"""Tiny random models written as the official weight files, for tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffbir.config import build_model, load_config
from diffbir.diffusion import NoiseSchedule


def write_tiny_weights(root: Path) -> Path:
    """Tiny random models (``control_ldm_tiny``, ``bsrnet_tiny``) saved like the official files
    in ``root`` (wrapped SD ckpt, flat .pth files); IRControlNet's zero convolutions get small
    random values so that the control has an effect. Returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cldm = build_model(load_config("control_ldm_tiny"))
    schedule = NoiseSchedule.linear()
    sd = {
        **cldm.sd_state_dict(),
        "betas": schedule.betas,
        "alphas_cumprod": schedule.alphas_cumprod,
    }
    torch.save({"state_dict": sd, "global_step": 0}, root / "v2-1_512-ema-pruned.ckpt")
    control = {
        k: torch.randn_like(v) * 0.05 if ("zero_convs" in k or "middle_block_out" in k) else v
        for k, v in cldm.controlnet.state_dict().items()
    }
    torch.save(control, root / "v2.pth")
    torch.save(build_model(load_config("bsrnet_tiny")).state_dict(), root / "BSRNet.pth")
    return root


TINY_LLAVA_CORPUS = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions. USER: Please give me "
    "a very short description of this image. ASSISTANT: a photo of a small cat on a red sofa, "
    "an old man with a hat, two dogs near the river, trees and houses under a blue sky"
)


def write_tiny_llava(folder: Path, seed: int = 0, weight_std: float = 0.5) -> Path:
    """A tiny random ``LlavaForConditionalGeneration`` saved like ``llava-hf/llava-1.5-7b-hf``
    in ``folder``: the official CLIP ViT-L/14-336 processor settings and 576 image tokens, a
    2-layer vision tower and language model of width 32, and a Llama-style tokenizer (BPE with
    byte fallback and ``▁`` word prefixes, ``<image>`` and ``<pad>`` added) trained on
    :data:`TINY_LLAVA_CORPUS`, whose newline is left to byte fallback as in Llama. Weights other
    than the norms are drawn with std ``weight_std``: at 0.5 greedy captions differ from image to
    image and some end early (end-of-sequence), which the default initialisation (0.02) does not
    give. Needs the ``caption`` extra. Returns ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlamaTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator([TINY_LLAVA_CORPUS], trainer)
    merges = [tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = LlamaTokenizer(vocab=bpe.get_vocab(), merges=merges, add_bos_token=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    processor = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        resample=3,  # bicubic
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": tokenizer.pad_token_id}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=336,
            patch_size=14,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            **ids,
        ),
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, weight_std)
    model.generation_config = GenerationConfig(**ids)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_tiny_clip_tags(folder: Path, seed: int = 0) -> Path:
    """A tiny random open_clip model saved as the ``clip-tags`` model folder in ``folder``
    (``open_clip_config.json``, ``open_clip_model.safetensors``): 32 px images, one layer per
    tower, width 32, open_clip's own tokenizer. Returns ``folder``."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    preprocess_cfg = {
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    return folder
