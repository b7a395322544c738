"""CLIP-format byte-level BPE vocabularies, built offline.

The tiny presets need tokenizers that behave like CLIP's (byte-level BPE with ``</w>`` word
ends, bos/eos, padding to 77), and the real-size presets need a 49408-entry vocabulary when
the real one is not in the local cache. Both are laid out exactly as CLIP lays its vocabulary
out: 256 byte symbols, the same with ``</w>``, one entry per merge, then reserved entries up
to the requested size, then ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
_WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def word_symbols(word: str) -> tuple[str, ...]:
    table = bytes_to_unicode()
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    return tuple(symbols)


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE over ``text``: the most frequent adjacent pair wins, ties broken by the pair.

    A merge whose result already exists as a token is skipped, so every merge adds exactly one
    new vocabulary entry, as CLIP's layout requires.
    """
    words = Counter(word_symbols(w) for w in _WORD_RE.findall(text.lower()))
    table = bytes_to_unicode()
    known = set(table.values()) | {s + END_OF_WORD for s in table.values()}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        candidates = sorted((pair for pair in pairs if "".join(pair) not in known),
                            key=lambda pair: (-pairs[pair], pair))
        if not candidates:
            break
        best = candidates[0]
        merges.append(best)
        known.add("".join(best))
        words = Counter({_merge_pair(symbols, best): count for symbols, count in words.items()})
    return merges


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def clip_vocab(merges: list[tuple[str, str]], vocab_size: int | None = None) -> dict[str, int]:
    """The vocabulary in CLIP's order; reserved entries pad it to ``vocab_size``."""
    base = list(bytes_to_unicode().values())
    tokens = base + [s + END_OF_WORD for s in base] + ["".join(pair) for pair in merges]
    minimum = len(tokens) + 2
    if vocab_size is not None:
        if vocab_size < minimum:
            raise ValueError(f"vocab_size {vocab_size} is below the {minimum} entries the merges need")
        tokens += [f"<|reserved_{i}|>" for i in range(vocab_size - minimum)]
    tokens += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("merges produce duplicate vocabulary entries")
    return vocab


@functools.lru_cache(maxsize=4)
def corpus_merges(num_merges: int) -> tuple[tuple[str, str], ...]:
    """Merges learned from the prompt corpus shipped with the package (deterministic)."""
    text = resources.files("linfusion").joinpath("configs/prompt_corpus.txt").read_text("utf-8")
    return tuple(learn_merges(text, num_merges))


def write_clip_tokenizer(directory: Path, merges: list[tuple[str, str]], vocab_size: int,
                         tokenizer_config: dict[str, Any],
                         special_tokens_map: dict[str, Any] | None = None) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config files in the hub's layout."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab(list(merges), vocab_size)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", "utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), "utf-8")
    special = special_tokens_map or {key: tokenizer_config[key] for key in
                                     ("bos_token", "eos_token", "pad_token", "unk_token")
                                     if key in tokenizer_config}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), "utf-8")
    return directory
