"""The three linear-attention plugins, registered with TensorRT's Python plugin API.

``register_plugins()`` defines, through ``tensorrt.plugin`` (TensorRT >= 10.10), the plugins
``linfusion::LinearAttentionState``, ``linfusion::LinearAttentionReduce`` and
``linfusion::LinearAttentionApply`` (see ``onnx_prep`` for the node contract). Each has only an
ahead-of-time implementation: at build time it compiles the CUDA kernels for the tensor's dtype
and head dim to PTX with NVRTC and returns the kernel name, the PTX, the launch geometry and the
extra int32 arguments as symbolic expressions of the input shapes. TensorRT embeds the PTX in
the engine, which then runs with no Python and no plugin library (trtexec, Triton, our runtime).

Launch geometry and extra arguments come from ``kernels`` (the same formulas the GPU check
uses), written against ``trtp.cdiv``/``trtp.min`` so that they stay symbolic in N and B.
State and apply offer kernel tactics for fp16/bf16 (CUDA-core and two tensor-core tilings, see
``kernels.tactics``); TensorRT times them at build time and embeds the fastest.
TensorRT is imported only inside these functions.

This module deliberately has no ``from __future__ import annotations``: ``tensorrt.plugin``
inspects the annotations as classes (``issubclass``), so they must not be strings. Attributes
arrive as the ONNX parser sends them, one-element int32 / float32 arrays; the ``aot_impl``
return annotation is mandatory.
"""

from functools import cache

import numpy as np
import numpy.typing as npt
from linfusion.runtime.contract import ops

from . import kernel_build as K

MIN_TENSORRT = (10, 10)
"""AOT Python plugins arrived in 10.9, but the 10.9 ONNX parser hands the QDP creator the node
name instead of the op type (NVIDIA's sample names nodes after their op type up to 10.9), so
our per-layer node names would not resolve; 10.10 passes the op type."""
PLUGIN_IDS = tuple(f"{ops.PLUGIN_NAMESPACE}::{op}" for op in ops.PLUGIN_OPS)
Int32Attr = npt.NDArray[np.int32]
Float32Attr = npt.NDArray[np.float32]
_registered: dict[str, str] = {}


class PluginUnavailable(RuntimeError):
    """The installed TensorRT cannot host the AOT plugins."""


def tensorrt_version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("."):
        digits = "".join(c for c in p if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def aot_support(trt) -> tuple[bool, str]:
    """Whether this TensorRT module supports AOT Python plugins, and why not."""
    version = getattr(trt, "__version__", "0")
    if tensorrt_version_tuple(version)[:2] < MIN_TENSORRT:
        return False, (f"TensorRT {version} is older than 10.10 (AOT Python plugins need 10.9, and its ONNX "
                       "parser resolves them by node name)")
    if not hasattr(trt, "QuickPluginCreationRequest"):
        return False, f"TensorRT {version} lacks QuickPluginCreationRequest (AOT plugins)"
    try:
        import tensorrt.plugin as trtp  # noqa: F401
    except ImportError as exc:
        return False, f"tensorrt.plugin is unavailable: {exc}"
    return True, ""


@cache
def _ptx(dtype: str, head_dim: int, arch: str) -> bytes:
    return K.compile_ptx(K.kernel_source([(dtype, head_dim)]), arch)


@cache
def _reduce_ptx(arch: str) -> bytes:
    return K.compile_ptx(K.kernel_source([]), arch)


def _dtype_name(trt, dtype) -> str:
    names = {trt.float32: "float32", trt.float16: "float16"}
    if hasattr(trt, "bfloat16"):
        names[trt.bfloat16] = "bfloat16"
    if dtype not in names:
        raise PluginUnavailable(f"linear-attention plugin: unsupported dtype {dtype}")
    return names[dtype]


def _head_dim(channels, heads: int) -> int | None:
    """The static head dim, or None while TensorRT probes with fake shapes."""
    if channels.is_fake:
        return None
    if not channels.is_constant:
        raise PluginUnavailable("linear attention needs a static channel count (H*d)")
    c = channels.constant_value()
    if c % heads:
        raise PluginUnavailable(f"{c} channels do not split into {heads} heads")
    return c // heads


def offered_tactics(dtype: str, arch: str, kernels: str = "auto") -> tuple[int, ...]:
    """The kernel tactics the state and apply plugins offer TensorRT for one I/O dtype."""
    if kernels not in K.KERNEL_CHOICES:
        raise ValueError(f"attention kernels must be one of {', '.join(K.KERNEL_CHOICES)}, not {kernels!r}")
    available = K.tactics(dtype, arch)
    if kernels == "cuda-core" or dtype == "float32":
        return (K.CUDA_CORE,)
    if kernels == "tensor-core":
        if K.TENSOR_CORE not in available:
            raise PluginUnavailable(f"tensor-core attention kernels need compute capability "
                                    f"{K.TENSOR_CORE_MIN_ARCH // 10}.0 or newer, not {arch}")
        return tuple(t for t in available if t != K.CUDA_CORE)
    return available


def register_plugins(arch: str = "compute_80", kernels: str = "auto") -> None:
    """Define the plugins once per process; ``arch`` is the NVRTC target (e.g. compute_90) and
    ``kernels`` restricts the tactics (auto: CUDA-core and, for fp16/bf16 on sm_80+, both
    tensor-core tilings; state declares one tensor-core tactic, as both share its kernel)."""
    if _registered:
        if (_registered.get("arch"), _registered.get("kernels")) != (arch, kernels):
            raise PluginUnavailable(f"plugins already registered for {_registered['arch']} "
                                    f"({_registered['kernels']} kernels), not {arch} ({kernels})")
        return
    apply_tactics = list(offered_tactics("float16", arch, kernels))
    state_tactics = [t for t in apply_tactics if t != K.TENSOR_CORE_WIDE]  # both tensor-core tactics: one state kernel
    import tensorrt as trt

    ok, why = aot_support(trt)
    if not ok:
        raise PluginUnavailable(why)
    import tensorrt.plugin as trtp

    def tune(fp32: str, half: str, half_tactics: list[int]) -> list:
        return [trtp.AutoTuneCombination(fp32, "LINEAR", [K.CUDA_CORE]),
                trtp.AutoTuneCombination(half, "LINEAR", half_tactics)]

    @trtp.register(PLUGIN_IDS[0])
    def _state_desc(k: trtp.TensorDesc, v: trtp.TensorDesc, heads: Int32Attr) -> trtp.TensorDesc:
        b, n, c = k.shape_expr[0], k.shape_expr[1], k.shape_expr[2]
        if c.is_fake:
            # The dtype-only pass: build no expressions from Python ints (TensorRT < 10.15 keeps a
            # stale expression builder in this pass).
            return trtp.from_shape_expr((b, b, b, b, b), dtype=trt.float32)
        h = int(heads[0])
        d = _head_dim(c, h)
        splits = K.num_splits(n, b, h, K.tiling(d), cdiv=trtp.cdiv, minimum=trtp.min)
        return trtp.from_shape_expr((b, h, splits, d, d + 1), dtype=trt.float32)

    @trtp.autotune(PLUGIN_IDS[0])
    def _state_tune(k: trtp.TensorDesc, v: trtp.TensorDesc, outputs) -> list[trtp.AutoTuneCombination]:
        return tune("FP32, FP32, FP32", "FP16|BF16, FP16|BF16, FP32", state_tactics)

    @trtp.aot_impl(PLUGIN_IDS[0])
    def _state_aot(k: trtp.TensorDesc, v: trtp.TensorDesc, heads: Int32Attr, outputs, tactic: int
                   ) -> tuple[str, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        h = int(heads[0])
        dtype = _dtype_name(trt, k.dtype)
        d = _head_dim(k.shape_expr[2], h)
        tactic = K.kernel_tactic(tactic, dtype, arch, d)
        b, n = k.shape_expr[0], k.shape_expr[1]
        launch = K.state_launch(outputs[0].shape_expr[2], b, h, K.tiling(d), tactic=tactic)
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n), trtp.SymInt32(h)])
        return K.state_kernel(dtype, d, tactic), _ptx(dtype, d, arch), _launch_params(trtp, launch), extra

    @trtp.register(PLUGIN_IDS[1])
    def _reduce_desc(partials: trtp.TensorDesc) -> trtp.TensorDesc:
        s = partials.shape_expr
        return trtp.from_shape_expr((s[0], s[1], s[3], s[4]), dtype=trt.float32)

    @trtp.autotune(PLUGIN_IDS[1])
    def _reduce_tune(partials: trtp.TensorDesc, outputs) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, FP32")]

    @trtp.aot_impl(PLUGIN_IDS[1])
    def _reduce_aot(partials: trtp.TensorDesc, outputs, tactic: int
                    ) -> tuple[str, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        s = partials.shape_expr
        elements = s[3] * s[4]
        launch = K.reduce_launch(s[0], s[1], elements, cdiv=trtp.cdiv)
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(s[2]), trtp.SymInt32(elements)])
        return K.REDUCE_KERNEL, _reduce_ptx(arch), _launch_params(trtp, launch), extra

    @trtp.register(PLUGIN_IDS[2])
    def _apply_desc(q: trtp.TensorDesc, state: trtp.TensorDesc, heads: Int32Attr, eps: Float32Attr
                    ) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(PLUGIN_IDS[2])
    def _apply_tune(q: trtp.TensorDesc, state: trtp.TensorDesc, outputs) -> list[trtp.AutoTuneCombination]:
        return tune("FP32, FP32, FP32", "FP16|BF16, FP32, FP16|BF16", apply_tactics)

    # tensorrt.plugin passes every attribute positionally, in registration order: keep both.
    @trtp.aot_impl(PLUGIN_IDS[2])
    def _apply_aot(q: trtp.TensorDesc, state: trtp.TensorDesc, heads: Int32Attr, eps: Float32Attr, outputs,
                   tactic: int) -> tuple[str, bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]:
        h = int(heads[0])
        dtype = _dtype_name(trt, q.dtype)
        d = _head_dim(q.shape_expr[2], h)
        tactic = K.kernel_tactic(tactic, dtype, arch, d)
        b, n = q.shape_expr[0], q.shape_expr[1]
        launch = K.apply_launch(n, b, h, K.tiling(d), cdiv=trtp.cdiv, tactic=tactic)
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n), trtp.SymInt32(h),
                                             trtp.SymInt32(K.eps_bits(float(eps[0])))])
        return K.apply_kernel(dtype, d, tactic), _ptx(dtype, d, arch), _launch_params(trtp, launch), extra

    _registered.update(arch=arch, kernels=kernels)


def _launch_params(trtp, launch: K.Launch):
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = launch.grid
    params.block_x, params.block_y, params.block_z = launch.block
    params.shared_mem = launch.shared_mem
    return params


def plugin_record(enabled: bool, arch: str | None = None, kernels: str = "auto", nvrtc: str | None = None) -> dict:
    """What engines.json records about the plugin."""
    record = {"names": list(PLUGIN_IDS), "namespace": ops.PLUGIN_NAMESPACE, "version": ops.PLUGIN_VERSION,
              "enabled": enabled, "implementation": "aot" if enabled else "inlined ONNX function"}
    if enabled:
        record["kernel_arch"] = arch
        record["nvrtc"] = nvrtc
        record["kernel_source"] = [f"engines/kernels/{name}" for name in K.SOURCE_FILES]
        record["kernel_tactics"] = {dtype: [K.TACTIC_NAMES[t] for t in offered_tactics(dtype, arch, kernels)]
                                    for dtype in K.DTYPES}
    return record
