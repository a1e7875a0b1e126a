"""``llava``: LLaVA-1.5-7B captions, as the official v2.1 run makes them (SPEC "Captioner").

The model is ``transformers``' ``LlavaForConditionalGeneration`` with the converted weights of
the official ``liuhaotian/llava-v1.5-7b`` (``llava-hf/llava-1.5-7b-hf`` on the Hub). What the
official run does, and so do we:

- the question :data:`QUESTION` in the ``llava_v1`` conversation (:func:`llava_v1_prompt`),
  tokenized as the official ``tokenizer_image_token`` does: the text before and after the
  ``<image>`` placeholder separately, the second part without its BOS token, the image tokens
  in between. (Tokenizing the whole text at once, as ``LlavaProcessor`` does, loses the ``▁``
  token that the separate tokenization puts before the newline.)
- the image as read, padded to a square with the processor's mean colour, the original centred
  (:func:`pad_to_square`), then the CLIP ViT-L/14-336 processor (PIL backend, as the official
  ``CLIPImageProcessor`` of its transformers version), cast to the model's dtype (float16 at
  4/8/16 bit, as the official run);
- greedy decoding (no sampling, one beam), at most :data:`MAX_NEW_TOKENS` new tokens; only the
  new tokens, up to the end-of-sequence token, decoded with special tokens skipped and stripped.
- 4-bit loading as the official builder: NF4, double quantization, float16 compute; the vision
  tower is not quantized (the official code loads it apart, in float16), nor is ``lm_head``.

Batches: every prompt has the same tokens (one question, 576 image tokens), so a batch needs no
padding and each row's attention and positions are those of a single image; rows differ only by
the floating-point order of batched kernels. The tests check batched == one at a time on the
tiny model (CPU, float32); ``batch_size`` 1 is the official behaviour and the default.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffbir.captioning.base import (
    Captioner,
    CaptionerError,
    CaptionerUnavailableError,
    require_packages,
)
from diffbir.captioning.hub import SAFETENSORS_INDEX, HubModel, resolve_model_folder
from diffbir.pipeline.device import cpu_has_fast_half

LLAVA = HubModel(
    captioner="llava",
    repo_id="llava-hf/llava-1.5-7b-hf",
    use="LLaVA-1.5-7B, the official captioner's weights converted to transformers, about 14 GB",
    allow_patterns=("*.json", "*.safetensors", "tokenizer.model"),
    required=("config.json", "preprocessor_config.json", "tokenizer_config.json"),
    one_of=(("tokenizer.json", "tokenizer.model"), ("model.safetensors", SAFETENSORS_INDEX)),
)

QUESTION = "Please give me a very short description of this image."
IMAGE_PLACEHOLDER = "<image>"
MAX_NEW_TOKENS = 512
# conv_templates["llava_v1"] of the official LLaVA: system text, roles, separator " ".
_LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)
_LLAVA_V1_ROLES = ("USER", "ASSISTANT")

# --captioner-precision -> (model dtype, bitsandbytes bits or None)
PRECISIONS: dict[str, tuple[torch.dtype, int | None]] = {
    "4bit": (torch.float16, 4),
    "8bit": (torch.float16, 8),
    "fp16": (torch.float16, None),
    "bf16": (torch.bfloat16, None),
    "fp32": (torch.float32, None),
}
OFFICIAL_PRECISION = "4bit"  # the official --llava_bit default
MIN_TRANSFORMERS = "5.25"


def llava_v1_prompt(question: str = QUESTION) -> str:
    """The official conversation text: the ``llava_v1`` system text, the user turn (image
    placeholder, newline, question) and an open assistant turn."""
    user, assistant = _LLAVA_V1_ROLES
    return f"{_LLAVA_V1_SYSTEM} {user}: {IMAGE_PLACEHOLDER}\n{question} {assistant}:"


def pad_to_square(image: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """``image`` (H x W x 3 uint8) centred on a square of side max(H, W) filled with ``colour``
    (official ``expand2square``: offset ``(long - short) // 2``); a square image is returned
    as is."""
    h, w = image.shape[:2]
    if h == w:
        return image
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[:] = np.asarray(colour, dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = image
    return out


def mean_colour(image_mean: list[float]) -> tuple[int, int, int]:
    """The padding colour of the official run: ``int(x * 255)`` of the processor's mean."""
    r, g, b = (int(x * 255) for x in image_mean)
    return r, g, b


def prompt_token_ids(tokenizer, image_token_id: int, image_tokens: int, prompt: str) -> list[int]:
    """The ids the official ``tokenizer_image_token`` gives ``prompt``, with its one image
    placeholder expanded to ``image_tokens`` copies of ``image_token_id`` (transformers' LLaVA
    puts one feature vector at each)."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) != 2:
        raise CaptionerError(
            f"prompt: expected one {IMAGE_PLACEHOLDER} placeholder, got {prompt!r}"
        )
    before, after = (tokenizer(part).input_ids for part in parts)
    # The official code keeps the first part's BOS and drops the first token of later parts
    # (their own BOS) whenever the first part starts with BOS.
    skip = 1 if before and before[0] == tokenizer.bos_token_id else 0
    return before + [image_token_id] * image_tokens + after[skip:]


def _check_precision(precision: str, device: torch.device) -> tuple[torch.dtype, int | None]:
    if precision not in PRECISIONS:
        raise CaptionerError(
            f"--captioner-precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    dtype, bits = PRECISIONS[precision]
    if bits is not None and device.type != "cuda":
        raise CaptionerError(
            f"--captioner-precision {precision}: {bits}-bit loading (bitsandbytes) needs a CUDA "
            f"device, got {device}; use fp32 (or bf16, fp16) here"
        )
    if device.type == "cpu" and not cpu_has_fast_half(dtype):
        warnings.warn(
            f"--captioner-precision {precision}: this CPU has no native {precision} support, so "
            "captioning runs far slower than in fp32 here",
            stacklevel=3,
        )
    return dtype, bits


def _check_transformers_version() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise CaptionerUnavailableError(
            f"captioner llava: needs transformers >= {MIN_TRANSFORMERS} (its PIL image-processor "
            f"backend), found {transformers.__version__}; run `pip install 'diffbir[caption]'`"
        )


def check_llava(
    model: str | os.PathLike,
    *,
    precision: str,
    device: torch.device,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[torch.dtype, int | None, Path]:
    """What loading the model needs, checked without loading it: the precision on ``device``,
    the packages, and the model folder with every file. Returns the model dtype, the
    bitsandbytes bits (or None) and the folder."""
    dtype, bits = _check_precision(precision, device)
    require_packages("transformers", "accelerate", *(["bitsandbytes"] if bits else []))
    _check_transformers_version()
    return dtype, bits, resolve_model_folder(model, LLAVA, cache_dir=cache_dir)


def _quantization(bits: int):
    from transformers import BitsAndBytesConfig

    # Kept unquantized as in the official run: the vision tower, and lm_head (bitsandbytes'
    # default skip, which an explicit skip list replaces).
    skip = ["vision_tower", "lm_head"]
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=torch.float16,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        llm_int8_skip_modules=skip,
    )


class LlavaCaptioner(Captioner):
    """LLaVA-1.5 captions (see the module docstring for what is official)."""

    name = "llava"

    def __init__(
        self,
        model: str | os.PathLike = LLAVA.repo_id,
        *,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        batch_size: int = 1,
        max_new_tokens: int = MAX_NEW_TOKENS,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(batch_size)
        self.device = torch.device(device)
        self.dtype, bits, folder = check_llava(
            model, precision=precision, device=self.device, cache_dir=cache_dir
        )
        from transformers import (
            AutoImageProcessor,
            AutoTokenizer,
            GenerationConfig,
            LlavaForConditionalGeneration,
        )

        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(
            folder, backend="pil", local_files_only=True
        )
        self.model = LlavaForConditionalGeneration.from_pretrained(
            folder,
            local_files_only=True,
            use_safetensors=True,
            dtype=self.dtype,
            device_map={"": self.device},
            quantization_config=_quantization(bits) if bits else None,
        ).eval()
        config = self.model.config
        vision = config.vision_config
        image_tokens = (vision.image_size // vision.patch_size) ** 2
        if config.vision_feature_select_strategy == "full":
            image_tokens += 1  # the CLS token is kept
        self.prompt_ids = prompt_token_ids(
            self.tokenizer, config.image_token_id, image_tokens, llava_v1_prompt()
        )
        self.pad_colour = mean_colour(self.image_processor.image_mean)
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos)
        self.generation_config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else min(self.eos_ids),
            bos_token_id=self.tokenizer.bos_token_id,
        )

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        """The model's image input: padded to a square, CLIP-processed, in the model dtype."""
        squares = [Image.fromarray(pad_to_square(im, self.pad_colour)) for im in images]
        pixels = self.image_processor(images=squares, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    @torch.inference_mode()
    def _caption_batch(self, images: list[np.ndarray]) -> list[str]:
        pixels = self.pixel_values(images)
        ids = torch.tensor([self.prompt_ids] * len(images), device=self.device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=pixels,
            generation_config=self.generation_config,
        )
        captions = []
        for row in out[:, ids.shape[1] :].tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
            text = self.tokenizer.decode(row[: end + 1], skip_special_tokens=True)
            captions.append(text.strip())
        return captions

    def _release(self) -> None:
        del self.model, self.tokenizer, self.image_processor
