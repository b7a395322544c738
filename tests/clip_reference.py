"""CLIP's tokenizer algorithm, re-implemented from OpenAI's description for cross-checking ids.

Byte-level symbols, '</w>' on each word's last symbol, merges applied lowest rank first,
bos + ids + eos, padded (or truncated) to 77.
"""

import json
import re

WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")


def byte_table():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class ClipReference:
    def __init__(self, folder):
        self.vocab = json.loads((folder / "vocab.json").read_text("utf-8"))
        lines = (folder / "merges.txt").read_text("utf-8").splitlines()[1:]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines) if line}
        self.table = byte_table()

    def bpe(self, word):
        symbols = [self.table[b] for b in word.encode()]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pairs = [(self.ranks.get(p, 1e18), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(pairs)
            if rank == 1e18:
                break
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        return [self.vocab[s] for s in symbols]

    def encode(self, text, pad_id, length=77):
        ids = [i for w in WORD.findall(" ".join(text.lower().split())) for i in self.bpe(w)]
        ids = [self.vocab["<|startoftext|>"]] + ids[: length - 2] + [self.vocab["<|endoftext|>"]]
        return ids + [pad_id] * (length - len(ids))
