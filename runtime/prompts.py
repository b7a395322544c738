"""Prompt encoding for SD (one text encoder) and SD-XL (two), as diffusers' pipelines do it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backends.base import ModelRunner
from .contract import TextEncoderIO as IO
from .text import ClipTokenizer


@dataclass
class PromptEmbeddings:
    """Conditioning for the UNet; ``pooled`` is SD-XL's text_embeds, None for SD."""

    hidden: np.ndarray
    pooled: np.ndarray | None = None


@dataclass
class TextStack:
    """The tokenizer/encoder pairs of a pipeline: one for SD, two for SD-XL."""

    tokenizers: list[ClipTokenizer]
    encoders: list[ModelRunner]
    xl: bool

    def encode(self, prompts: list[str]) -> PromptEmbeddings:
        if not self.xl:
            ids = self.tokenizers[0](prompts)
            hidden = self.encoders[0].run({IO.input_ids: ids}, [IO.last_hidden_state])[IO.last_hidden_state]
            return PromptEmbeddings(hidden.astype(np.float32))
        # SD-XL: penultimate hidden states of both encoders side by side, pooled from encoder 2.
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            wanted = [IO.penultimate_hidden_state] + ([IO.text_embeds] if IO.text_embeds in encoder.output_names else [])
            out = encoder.run({IO.input_ids: tokenizer(prompts)}, wanted)
            hidden_states.append(out[IO.penultimate_hidden_state].astype(np.float32))
            if IO.text_embeds in out:
                pooled = out[IO.text_embeds].astype(np.float32)
        return PromptEmbeddings(np.concatenate(hidden_states, axis=-1), pooled)

    def encode_pair(self, prompts: list[str], negative: list[str] | None,
                    force_zeros_for_empty_prompt: bool) -> tuple[PromptEmbeddings, PromptEmbeddings]:
        """(negative, positive) embeddings for classifier-free guidance.

        SD-XL with ``force_zeros_for_empty_prompt`` uses zeros when no negative prompt is given;
        an explicit empty string is encoded like any other prompt.
        """
        positive = self.encode(prompts)
        if negative is None and self.xl and force_zeros_for_empty_prompt:
            zeros = PromptEmbeddings(np.zeros_like(positive.hidden),
                                     None if positive.pooled is None else np.zeros_like(positive.pooled))
            return zeros, positive
        return self.encode(negative if negative is not None else [""] * len(prompts)), positive


def sdxl_time_ids(height: int, width: int, batch: int, crop: tuple[int, int] = (0, 0),
                  original: tuple[int, int] | None = None) -> np.ndarray:
    """[original h, w, crop top, left, target h, w] per sample, as SD-XL was trained."""
    original = original or (height, width)
    return np.tile(np.array([*original, *crop, height, width], dtype=np.float32), (batch, 1))
