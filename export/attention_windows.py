"""Softmax self-attention over query windows: no token x token score matrix in the exported graph.

The VAE's mid-block attention and a ControlNet's self-attention are plain softmax attention over
every token of their level. PyTorch's CPU kernel streams over the keys; the exported graph
materialises the scores and their softmax instead: at 1024 px one SD VAE call holds two
16384 x 16384 float tensors (2 GiB), a ControlNet's first level eight times that. A query's row of
the softmax depends on that query alone, so the queries run in ``k`` windows against all keys and
the outputs are concatenated: the same numbers, score tensors ``k`` times smaller.

``k`` is static (the graph is unrolled): the queries are padded to a multiple of ``k`` at run time,
viewed as ``k`` windows and taken by constant index (so any token count works, even fewer than
``k``), and the padding rows are dropped. ``QUERY_WINDOWS``, fewer where the trace size would leave a
window under two queries (a one-query window would be specialised at trace time).
The manifest records the windows of a component's largest level (``ComponentSpec.attention_windows``),
which the memory guard reads. LinFusion's own attention (the UNet's ``attn1``) is linear and the
cross-attentions see 77 keys: neither is touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from math import prod

import torch
import torch.nn.functional as F
from torch import nn

from . import chunking
from .components import Component

QUERY_WINDOWS = 16
"""Windows per softmax self-attention. At 1024 px an SD VAE's score window is 1024 x 16384 floats
(64 MiB) instead of 1 GiB, at no measurable cost at 512 px. More windows cost export time: tracing
takes about 0.15 s per window and attention module (64 windows: +10 s per tiny VAE)."""


def targets(root: nn.Module) -> list[str]:
    """Display names of the softmax self-attention modules under ``root``."""
    from diffusers.models.attention_processor import Attention

    names = chunking.display_names(root)
    return [names[m] for m in root.modules() if isinstance(m, Attention) and not m.is_cross_attention]


def plan(component: Component) -> dict[str, int]:
    """Windows per softmax self-attention module of ``component`` (empty when it has none), from a
    shape-only run at its trace size."""
    found = targets(component.module)
    if not found:
        return {}
    example = component.make_inputs(2, *component.trace_size, torch.Generator().manual_seed(0))
    measured = chunking.measure(component.module, tuple(t.to("meta") for t in example))
    result = {}
    for name in found:
        shape = measured.inputs.get(name)
        if shape is None:  # not called at this size
            continue
        tokens = prod(shape[2:]) if len(shape) == 4 else shape[1]
        result[name] = max(1, min(QUERY_WINDOWS, tokens // 2))
    return result


def largest_level(windows: dict[str, int]) -> int | None:
    """The windows of the attention with the most tokens (more tokens never get fewer windows);
    None when there is no softmax self-attention."""
    return max(windows.values(), default=None)


@contextlib.contextmanager
def applied(root: nn.Module, windows: dict[str, int]) -> Iterator[int]:
    """Within the block the named attention modules run their softmax over ``k`` query windows;
    yields the number of modules windowed. Works by routing ``F.scaled_dot_product_attention``
    (what diffusers' attention processors call) while one of those modules runs."""
    by_name = {name: module for module, name in chunking.display_names(root).items()}
    patched = [(by_name[name], k) for name, k in windows.items() if k > 1]
    if not patched:
        yield 0
        return
    original = F.scaled_dot_product_attention
    active: list[int] = []

    def windowed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if not active or active[-1] == 1 or attn_mask is not None or is_causal or dropout_p:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        return chunking.over_windows(query, active[-1],
                                     lambda window: original(window, key, value, scale=scale, **kwargs))

    def entering(forward: Callable, k: int) -> Callable:
        def call(*args, **kwargs):
            active.append(k)
            try:
                return forward(*args, **kwargs)
            finally:
                active.pop()
        return call

    F.scaled_dot_product_attention = windowed
    for module, k in patched:
        module.forward = entering(type(module).forward.__get__(module), k)
    try:
        yield len(patched)
    finally:
        F.scaled_dot_product_attention = original
        for module, _ in patched:
            del module.forward
