"""CLIP tokenization with the `tokenizers` library, matching transformers' CLIPTokenizer ids.

SD pads with eos; SD-2.x and SD-XL's second tokenizer pad with "!" (id 0). The pad token is
read from the exported ``special_tokens_map.json``, so each tokenizer folder says its own.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np


class ClipTokenizer:
    """Encodes prompts to fixed-length id arrays: bos, tokens, eos, then padding."""

    def __init__(self, folder: str | Path, max_length: int = 77) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        special = json.loads((folder / "special_tokens_map.json").read_text("utf-8"))
        self.max_length = max_length
        self.bos_id = self._token_id(special, "bos_token")
        self.eos_id = self._token_id(special, "eos_token")
        self.pad_id = self._token_id(special, "pad_token")

    def _token_id(self, special: dict, key: str) -> int:
        token = special[key]
        token = token["content"] if isinstance(token, dict) else token
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no id for its {key} {token!r}")
        return token_id

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """[len(prompts), max_length] int64 ids; longer prompts are truncated with a warning."""
        rows = []
        for prompt, encoding in zip(prompts, self.tokenizer.encode_batch(list(prompts))):
            ids = encoding.ids
            if ids[:1] != [self.bos_id]:  # a tokenizer.json without CLIP's post-processor
                ids = [self.bos_id, *ids, self.eos_id]
            if len(ids) > self.max_length:
                dropped = self.tokenizer.decode(ids[self.max_length - 1:-1])
                warnings.warn(f"prompt truncated to {self.max_length} tokens; dropped: {dropped!r}",
                              stacklevel=2)
                ids = ids[: self.max_length - 1] + [self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return np.asarray(rows, dtype=np.int64)
