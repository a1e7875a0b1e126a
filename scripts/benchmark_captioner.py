"""Captioner cost on this machine: measured with the tiny LLaVA, estimated for LLaVA-1.5-7B.

Measured: the tiny random LLaVA (``write_tiny_llava``) captions real photos through
``LlavaCaptioner``: load time, seconds per image, generated tokens, peak resident memory.

Estimated (no 7B weights here): the 7B model's parts are timed at their real sizes with random
weights, one and two layers each, on the real sequence (576 image tokens + the prompt): the
Llama-7B decoder (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) for the prefill and for
one cached decoding step, and the CLIP ViT-L/14-336 vision tower. The per-layer cost is the
difference between two and one layers, so the fixed part (embeddings, lm_head) is counted once;
32 decoder and 24 vision layers are then extrapolated. Weight memory is the parameter count
times the bytes per parameter.

    python scripts/benchmark_captioner.py --photos 4 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, vocab_size=32000)
VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336)
LLAMA_LAYERS, VIT_LAYERS = 32, 24
LLAVA_7B_PARAMS = 7.06e9  # Llama-7B 6.74e9 + CLIP ViT-L/14-336 0.30e9 + projector 0.02e9


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure_tiny(photos: list[np.ndarray], max_new_tokens: int) -> None:
    from diffbir.captioning.llava import LlavaCaptioner
    from diffbir.tiny_weights import write_tiny_llava

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_llava(Path(tmp) / "llava")
        before = peak_rss_gib()
        start = time.perf_counter()
        captioner = LlavaCaptioner(folder, max_new_tokens=max_new_tokens)
        print(f"tiny llava: load {time.perf_counter() - start:.2f} s")
        generate, steps = captioner.model.generate, []

        def counting(**kwargs):
            out = generate(**kwargs)
            steps.append(out.shape[1] - kwargs["input_ids"].shape[1])
            return out

        captioner.model.generate = counting
        for batch in (1, len(photos)):
            captioner.batch_size = batch
            steps.clear()
            start = time.perf_counter()
            captioner.caption(photos)
            seconds = time.perf_counter() - start
            print(
                f"tiny llava, batch {batch}: {seconds / len(photos):.2f} s per image, "
                f"{1e3 * seconds / sum(steps):.0f} ms per decoding step ({sum(steps)} steps)"
            )
        print(f"tiny llava: peak resident {peak_rss_gib():.2f} GiB (before load {before:.2f} GiB)")


def _timed(fn, repeat: int = 1) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def llama_costs(layers: int, seq: int) -> tuple[float, float]:
    """(prefill seconds for ``seq`` tokens, seconds per cached decoding step)."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, num_key_value_heads=32, **LLAMA_7B)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 32000, (1, seq))
    with torch.inference_mode():
        prefill = _timed(lambda: model(input_ids=ids, logits_to_keep=1))
        cache = DynamicCache(config=config)
        model(input_ids=ids, cache=cache, logits_to_keep=1)
        step = torch.tensor([[5]])
        position = torch.tensor([[seq]])

        def decode():
            model(input_ids=step, position_ids=position, cache=cache, logits_to_keep=1)
            cache.crop(-1)  # drop the new token: every step decodes at position seq

        return prefill, _timed(decode, repeat=5)


def vision_cost(layers: int) -> float:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(num_hidden_layers=layers, patch_size=14, **VIT_L_336))
    pixels = torch.randn(1, 3, 336, 336)
    with torch.inference_mode():
        return _timed(lambda: model.eval()(pixel_values=pixels))


def estimate_7b(seq: int, caption_tokens: int) -> None:
    (p1, d1), (p2, d2) = llama_costs(1, seq), llama_costs(2, seq)
    v1, v2 = vision_cost(1), vision_cost(2)
    prefill = p1 + (LLAMA_LAYERS - 1) * (p2 - p1)
    step = d1 + (LLAMA_LAYERS - 1) * (d2 - d1)
    vision = v1 + (VIT_LAYERS - 1) * (v2 - v1)
    total = vision + prefill + caption_tokens * step
    print(
        f"7B fp32 on this CPU (estimate): vision {vision:.1f} s + prefill of {seq} tokens "
        f"{prefill:.1f} s + {caption_tokens} tokens x {step:.2f} s = {total:.0f} s per image"
    )
    for name, nbytes in (("fp32", 4), ("fp16/bf16", 2)):
        print(f"7B weights in {name}: {LLAVA_7B_PARAMS * nbytes / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=4, help="real47 photos to caption")
    parser.add_argument("--shared", default="/work/shared/data/real47")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--caption-tokens", type=int, default=20, help="assumed 7B caption length")
    parser.add_argument("--skip-7b", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = sorted(p for p in Path(args.shared).iterdir() if p.suffix in (".jpg", ".png"))
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths[: args.photos]]
    measure_tiny(photos, args.max_new_tokens)
    if not args.skip_7b:
        prompt_tokens = 576 + 64  # image tokens + the conversation text (about 64 Llama tokens)
        estimate_7b(prompt_tokens, args.caption_tokens)


if __name__ == "__main__":
    main()
