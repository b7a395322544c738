"""No tensor above the limit up to the declared maximum size: token chunking of the UNet.

At 16384x8192 an SD-1.5 UNet makes tensors beyond 2^31 - 1 elements (TensorRT's limit and many
CUDA kernels'): the GEGLU projection of the level-0 feed-forwards alone is 2,097,152 tokens x
2560 channels. The feed-forward and the cross-attention (``attn2``) of a transformer block treat
every token on its own, so they run on ``k`` windows of the token axis and the results are
concatenated. ``k`` is static (the graph is unrolled) and chosen per module so that at
``--max-size`` and batch 1 none of their tensors exceeds ``--tensor-limit``; H and W stay
symbolic (the window bounds are ``i * N // k``, computed from the run-time token count N).

Element counts come from a shape-only run of the component (``measure``): the module runs with
meta tensors in place of its weights and inputs (``torch.func.functional_call``; nothing is
allocated, a UNet pass takes seconds), softmax attention in PyTorch's math form (the exported
graph materialises the scores as well), and every op's output shape recorded under the module
that made it. A tensor outside the chunkable modules above the limit (a convolution activation,
the skip concatenation of an up block) cannot be chunked away: the export refuses with one line
before any tracing.

The windows never are empty (at N < k a window is one token and its surplus output is sliced
away), because an empty query breaks the attention's reshapes at run time. Patching is done on
the module instances' ``forward`` for the duration of the trace (``applied``), so weight names
and the eager model are unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from linfusion.runtime.contract import Axis
from linfusion.runtime.contract.components import LargestTensor
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from .components import MAX_LATENT, Component

DEFAULT_MAX_SIZE = (16384, 8192)
DEFAULT_TENSOR_LIMIT = 2**31 - 1
PLAN_ROUNDS = 4


class TensorLimitError(ValueError):
    """A tensor that cannot be kept under the limit, or a bad max size; the message is one line."""


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise TensorLimitError(f"size must look like 16384x8192 (WxH), got {text!r}") from None
    if width <= 0 or height <= 0:
        raise TensorLimitError(f"size {text!r} must be positive")
    return width, height


def check_max_size(size: tuple[int, int], pixel_multiple: int, vae_factor: int) -> None:
    if len(size) != 2 or min(size) <= 0:
        raise TensorLimitError(f"--max-size must be a positive (width, height), got {size!r}")
    width, height = size
    if width % pixel_multiple or height % pixel_multiple:
        raise TensorLimitError(f"--max-size {width}x{height} must be a multiple of {pixel_multiple} pixels "
                               f"per side")
    if max(size) > MAX_LATENT * vae_factor:
        raise TensorLimitError(f"--max-size {width}x{height}: sides up to {MAX_LATENT * vae_factor} pixels "
                               f"are supported")


# --- shape-only runs ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorRecord:
    module: str
    """Dotted path below the component's root module ("" for the root itself)."""
    op: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        return f"{self.module or '<root>'}/{self.op}"

    def largest_tensor(self) -> LargestTensor:
        return LargestTensor(self.name, self.elements, self.shape)

    def describe(self) -> str:
        return f"{self.name} {list(self.shape)}"

    def inside(self, module: str) -> bool:
        return self.module == module or self.module.startswith(module + ".")


@dataclass
class Measurement:
    records: list[TensorRecord] = field(default_factory=list)
    inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Shape of the first tensor argument of each module call (the last call wins)."""

    def largest(self, where: Callable[[TensorRecord], bool] = lambda r: True) -> TensorRecord | None:
        return max((r for r in self.records if where(r)), key=lambda r: r.elements, default=None)


class _Recorder(TorchDispatchMode):
    def __init__(self, stack: list[str], out: Measurement) -> None:
        super().__init__()
        self.stack, self.out = stack, out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        op = func.overloadpacket.__name__
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                self.out.records.append(TensorRecord(self.stack[-1], op, tuple(value.shape)))
        return result


def display_names(root: nn.Module) -> dict[nn.Module, str]:
    """Module -> path, without the wrapper's own attribute (``unet.``, ``vae.``, ``encoder.``)."""
    children = list(root.named_children())
    prefix = children[0][0] if len(children) == 1 else None
    names = {}
    for name, module in root.named_modules():
        if prefix is not None and (name == prefix or name.startswith(prefix + ".")):
            name = name[len(prefix) + 1:]
        names.setdefault(module, name)
    return names


@contextlib.contextmanager
def _module_scopes(root: nn.Module, out: Measurement) -> Iterator[list[str]]:
    stack = [""]
    names = display_names(root)
    handles = []

    def enter(module, args):
        stack.append(names[module])
        tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if tensor is not None:
            out.inputs[names[module]] = tuple(tensor.shape)

    def leave(module, args, result):
        stack.pop()

    for module in names:
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def meta_inputs(component: Component, batch: int, size: tuple[int, int],
                vae_factor: int) -> tuple[torch.Tensor, ...]:
    """Meta tensors shaped like ``component``'s inputs at ``size`` = (width, height) pixels."""
    width, height = size
    tensors = []
    for spec in component.inputs:
        shape = []
        for axis in spec.shape:
            if isinstance(axis, int):
                shape.append(axis)
            elif axis == Axis.BATCH:
                shape.append(batch)
            else:  # a spatial axis, or a UNet level's side (ControlNet residuals: height_div4)
                base, divisor = Axis.resolve(axis)
                pixels = height if base in Axis.VERTICAL else width
                shape.append((pixels // vae_factor if Axis.UNITS[base] == "latent" else pixels) // divisor)
        tensors.append(torch.empty(shape, dtype=getattr(torch, spec.dtype), device="meta"))
    return tuple(tensors)


def measure(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Measurement:
    """Every op's output shape in one run of ``module`` on meta ``inputs``, by module path."""
    out = Measurement()
    weights = {name: torch.empty_like(t, device="meta")
               for name, t in [*module.named_parameters(), *module.named_buffers()]}
    with (_module_scopes(module, out) as stack, torch.device("meta"), sdpa_kernel([SDPBackend.MATH]),
          torch.no_grad(), _Recorder(stack, out)):
        functional_call(module, weights, inputs, strict=False)
    return out


# --- chunking -----------------------------------------------------------------------------------

def chunkable(root: nn.Module) -> list[str]:
    """The feed-forward and cross-attention of every transformer block (display names)."""
    from diffusers.models.attention import BasicTransformerBlock

    names = display_names(root)
    found = []
    for module in root.modules():
        if isinstance(module, BasicTransformerBlock):
            found += [names[m] for m in (module.ff, module.attn2) if m is not None]
    return found


def over_windows(x: torch.Tensor, k: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` on ``k`` windows of the token axis of ``x`` (``(*lead, tokens, channels)``), concatenated:
    ``x`` is padded with zero tokens to a multiple of ``k``, viewed as ``k`` windows taken by constant
    index, and the padding's output is dropped. One symbolic reshape, where ``k`` symbolic slices made
    tracing ~10 s slower per window; never empty (at tokens < k a window is one token)."""
    *lead, tokens, channels = x.shape
    rows = (tokens + k - 1) // k
    windows = F.pad(x, (0, 0, 0, rows * k - tokens)).reshape(*lead, k, rows, channels)
    out = torch.stack([fn(windows.select(-3, i)) for i in range(k)], dim=-3)
    return out.reshape(*lead, rows * k, out.shape[-1])[..., :tokens, :]


def _token_windows(forward: Callable, chunks: int) -> Callable:
    def chunked(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if hidden_states.dim() != 3:
            return forward(hidden_states, *args, **kwargs)
        return over_windows(hidden_states, chunks, lambda window: forward(window, *args, **kwargs))

    return chunked


@contextlib.contextmanager
def applied(root: nn.Module, chunks: dict[str, int]) -> Iterator[int]:
    """Within the block the named modules (display names) run on ``k`` token windows; yields the
    number of modules patched. Modules with ``k == 1`` are left alone."""
    by_name = {name: module for module, name in display_names(root).items()}
    patched = [(by_name[name], k) for name, k in chunks.items() if k > 1]
    for module, k in patched:
        module.forward = _token_windows(type(module).forward.__get__(module), k)
    try:
        yield len(patched)
    finally:
        for module, _ in patched:
            del module.forward


@dataclass(frozen=True)
class ChunkPlan:
    chunks: dict[str, int]
    """Chunkable module -> token windows (1: not chunked)."""
    largest: TensorRecord
    """The UNet's largest tensor at the max size and batch 1, chunks applied."""
    max_batch2_size: tuple[int, int]
    trace_size: tuple[int, int]
    """Latent (height, width) to trace at: every window at least two tokens wide, since a window of
    one token at trace time would be specialised (size-1 broadcasting) and break other sizes."""


def _refusal(component: str, record: TensorRecord, size: tuple[int, int], limit: int) -> TensorLimitError:
    return TensorLimitError(
        f"{component}: tensor {record.describe()} has {record.elements:,} elements at {size[0]}x{size[1]}, "
        f"above the tensor limit of {limit:,}, and cannot be chunked; lower --max-size or raise "
        f"--tensor-limit")


def _initial_chunks(measured: Measurement, targets: list[str], limit: int, component: str,
                    size: tuple[int, int]) -> dict[str, int]:
    chunks = {}
    for name in targets:
        tokens = measured.inputs[name][1]
        inside = [r for r in measured.records if r.inside(name)]
        per_token = [r.elements // tokens for r in inside if tokens in r.shape]
        fixed = max((r for r in inside if tokens not in r.shape), key=lambda r: r.elements, default=None)
        if fixed is not None and fixed.elements > limit:
            raise _refusal(component, fixed, size, limit)
        widest = max(per_token, default=0)
        if widest * tokens <= limit:
            chunks[name] = 1
            continue
        per_window = limit // widest
        if per_window == 0:
            raise _refusal(component, max(inside, key=lambda r: r.elements), size, limit)
        chunks[name] = min(tokens, math.ceil(tokens / per_window))
    return chunks


def plan_unet(component: Component, max_size: tuple[int, int], limit: int, vae_factor: int,
              pixel_multiple: int) -> ChunkPlan:
    """The token windows per chunkable module, checked by a second shape-only run, and the
    largest batch-2 size; raises TensorLimitError naming a tensor that cannot be kept under."""
    name = component.name
    targets = chunkable(component.module)
    measured = measure(component.module, meta_inputs(component, 1, max_size, vae_factor))
    unchunkable = measured.largest(lambda r: not any(r.inside(t) for t in targets))
    if unchunkable is not None and unchunkable.elements > limit:
        raise _refusal(name, unchunkable, max_size, limit)
    chunks = _initial_chunks(measured, targets, limit, name, max_size)
    for _ in range(PLAN_ROUNDS):  # the per-token estimate is checked, and raised where it fell short
        with applied(component.module, chunks):
            checked = measure(component.module, meta_inputs(component, 1, max_size, vae_factor))
        over = [r for r in checked.records if r.elements > limit]
        if not over:
            break
        worst: dict[str, TensorRecord] = {}
        for record in over:
            owner = next((t for t in targets if record.inside(t)), None)
            if owner is None or chunks[owner] >= measured.inputs[owner][1]:
                raise _refusal(name, record, max_size, limit)
            if owner not in worst or record.elements > worst[owner].elements:
                worst[owner] = record
        for owner, record in worst.items():
            chunks[owner] = min(measured.inputs[owner][1], math.ceil(chunks[owner] * record.elements / limit))
    else:
        raise _refusal(name, max(over, key=lambda r: r.elements), max_size, limit)
    largest = checked.largest()
    batch2 = largest_batch2_size(component, chunks, max_size, limit, vae_factor, pixel_multiple,
                                 largest.elements)
    return ChunkPlan(chunks, largest, batch2, _trace_size(component, chunks, measured, max_size, vae_factor))


def _trace_size(component: Component, chunks: dict[str, int], measured: Measurement,
                max_size: tuple[int, int], vae_factor: int) -> tuple[int, int]:
    """The component's trace size, scaled up until every window has two tokens or more."""
    area = (max_size[0] // vae_factor) * (max_size[1] // vae_factor)  # tokens scale with the latent area
    height, width = component.trace_size
    for scale in range(1, max_size[1] // vae_factor // height + 1):
        trace_area = height * width * scale * scale
        if all(measured.inputs[name][1] * trace_area // area >= 2 * k for name, k in chunks.items() if k > 1):
            return height * scale, width * scale
    raise TensorLimitError(f"{component.name}: the tensor limit leaves token windows of one token; "
                           f"raise --tensor-limit")


def largest_batch2_size(component: Component, chunks: dict[str, int], max_size: tuple[int, int], limit: int,
                        vae_factor: int, pixel_multiple: int, largest_at_batch1: int) -> tuple[int, int]:
    """The largest size (width, height) with ``max_size``'s aspect ratio, sides multiples of
    ``pixel_multiple``, at which the UNet at batch 2 keeps every tensor under ``limit``; (0, 0)
    if none. Started from the proportional estimate, then checked by shape-only runs."""
    width, height = max_size
    step = math.gcd(width, height) // pixel_multiple  # sizes (width, height) * j / step, j = 1..step

    def size(j: int) -> tuple[int, int]:
        return width * j // step, height * j // step

    def fits(j: int) -> bool:
        with applied(component.module, chunks):
            m = measure(component.module, meta_inputs(component, 2, size(j), vae_factor))
        return m.largest().elements <= limit

    if 2 * largest_at_batch1 <= limit:
        return max_size
    j = max(1, min(step - 1, int(step * math.sqrt(limit / (2 * largest_at_batch1)))))
    if fits(j):
        while j < step and fits(j + 1):
            j += 1
        return size(j)
    while j > 1:
        j -= 1
        if fits(j):
            return size(j)
    return (0, 0)


def largest_tensor(component: Component, max_size: tuple[int, int], vae_factor: int) -> TensorRecord:
    """The largest tensor of an unchunked component at ``max_size`` and batch 1."""
    return measure(component.module, meta_inputs(component, 1, max_size, vae_factor)).largest()
