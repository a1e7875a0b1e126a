"""SD 2.1's text encoder: the OpenCLIP ViT-H-14 text tower, read at its penultimate layer."""

from __future__ import annotations

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from torch import Tensor, nn


class OpenCLIPTextEncoder(TextTransformer):
    """Prompts -> hidden states (B, 77, width) after the penultimate block, then ``ln_final``.

    The parameter names are those of open_clip's CLIP text tower, i.e. the official
    ``cond_stage_model.model.*`` keys. ``text_projection`` and ``logit_scale`` are held so that the
    official file loads unchanged; SD does not use them.
    """

    def __init__(
        self,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        context_length: int = 77,
        vocab_size: int = 49408,
        embed_dim: int = 1024,
        skip_last_layers: int = 1,
    ):
        super().__init__(
            context_length=context_length,
            vocab_size=vocab_size,
            width=width,
            heads=heads,
            layers=layers,
            output_dim=embed_dim,
        )
        if not 0 <= skip_last_layers < layers:
            raise ValueError(f"skip_last_layers must be in [0, {layers}), got {skip_last_layers}")
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.skip_last_layers = skip_last_layers
        self.tokenizer = SimpleTokenizer(context_length=context_length)

    def tokenize(self, prompts: list[str]) -> Tensor:
        """BPE token ids, padded/truncated to the context length, shape (B, 77)."""
        return self.tokenizer(list(prompts))

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Token ids (B, 77) -> hidden states (B, 77, width)."""
        x = self.token_embedding(tokens) + self.positional_embedding.to(self.token_embedding.weight)
        mask = self.attn_mask.to(device=x.device, dtype=x.dtype)
        blocks = self.transformer.resblocks
        for block in blocks[: len(blocks) - self.skip_last_layers]:
            x = block(x, attn_mask=mask)
        return self.ln_final(x)

    def forward(self, prompts: list[str]) -> Tensor:  # type: ignore[override]
        device = self.token_embedding.weight.device
        return self.encode_tokens(self.tokenize(prompts).to(device))
