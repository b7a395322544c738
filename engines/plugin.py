"""The three linear-attention plugins, registered with TensorRT's Python plugin API.

``register_plugins()`` defines, through ``tensorrt.plugin`` (TensorRT >= 10.9), the plugins
``linfusion::LinearAttentionState``, ``linfusion::LinearAttentionReduce`` and
``linfusion::LinearAttentionApply`` (see ``onnx_prep`` for the node contract). Each has only an
ahead-of-time implementation: at build time it compiles the CUDA kernels for the tensor's dtype
and head dim to PTX with NVRTC and returns the kernel name, the PTX, the launch geometry and the
extra int32 arguments as symbolic expressions of the input shapes. TensorRT embeds the PTX in
the engine, which then runs with no Python and no plugin library (trtexec, Triton, our runtime).

Launch geometry and extra arguments come from ``kernels`` (the same formulas the GPU check
uses), written against ``trtp.cdiv``/``trtp.min`` so that they stay symbolic in N and B.
TensorRT is imported only inside these functions.
"""

from __future__ import annotations

from functools import cache

from . import kernels as K
from .onnx_prep import APPLY_OP, PLUGIN_NAMESPACE, PLUGIN_VERSION, REDUCE_OP, STATE_OP

MIN_TENSORRT = (10, 9)
PLUGIN_IDS = tuple(f"{PLUGIN_NAMESPACE}::{op}" for op in (STATE_OP, REDUCE_OP, APPLY_OP))
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
        return False, f"TensorRT {version} is older than 10.9, which introduced AOT Python plugins"
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


def register_plugins(arch: str = "compute_80") -> None:
    """Define the plugins once per process; ``arch`` is the NVRTC target (e.g. compute_90)."""
    if _registered:
        if _registered.get("arch") != arch:
            raise PluginUnavailable(f"plugins already registered for {_registered['arch']}, not {arch}")
        return
    import tensorrt as trt

    ok, why = aot_support(trt)
    if not ok:
        raise PluginUnavailable(why)
    import tensorrt.plugin as trtp

    io_types = "FP32|FP16|BF16"

    @trtp.register(PLUGIN_IDS[0])
    def _state_desc(k: trtp.TensorDesc, v: trtp.TensorDesc, heads: int) -> trtp.TensorDesc:
        b, n, c = k.shape_expr[0], k.shape_expr[1], k.shape_expr[2]
        d = _head_dim(c, heads)
        tiles = K.tiling(d) if d else K.tiling(64)
        splits = K.num_splits(n, b, heads, tiles, cdiv=trtp.cdiv, minimum=trtp.min)
        dd = c // heads
        return trtp.from_shape_expr((b, heads, splits, dd, dd + 1), dtype=trt.float32)

    @trtp.autotune(PLUGIN_IDS[0])
    def _state_tune(k: trtp.TensorDesc, v: trtp.TensorDesc, outputs):
        return [trtp.AutoTuneCombination(f"{io_types}, {io_types}, FP32")]

    @trtp.aot_impl(PLUGIN_IDS[0])
    def _state_aot(k: trtp.TensorDesc, v: trtp.TensorDesc, heads: int, outputs, tactic: int):
        dtype = _dtype_name(trt, k.dtype)
        d = _head_dim(k.shape_expr[2], heads)
        t = K.tiling(d)
        b, n = k.shape_expr[0], k.shape_expr[1]
        launch = K.state_launch(outputs[0].shape_expr[2], b, heads, t)
        params = _launch_params(trtp, launch)
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n), trtp.SymInt32(heads)])
        return K.state_kernel(dtype, d), _ptx(dtype, d, arch), params, extra

    @trtp.register(PLUGIN_IDS[1])
    def _reduce_desc(partials: trtp.TensorDesc) -> trtp.TensorDesc:
        s = partials.shape_expr
        return trtp.from_shape_expr((s[0], s[1], s[3], s[4]), dtype=trt.float32)

    @trtp.autotune(PLUGIN_IDS[1])
    def _reduce_tune(partials: trtp.TensorDesc, outputs):
        return [trtp.AutoTuneCombination("FP32, FP32")]

    @trtp.aot_impl(PLUGIN_IDS[1])
    def _reduce_aot(partials: trtp.TensorDesc, outputs, tactic: int):
        s = partials.shape_expr
        elements = s[3] * s[4]
        launch = K.reduce_launch(s[0], s[1], elements, cdiv=trtp.cdiv)
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(s[2]), trtp.SymInt32(elements)])
        return K.REDUCE_KERNEL, _reduce_ptx(arch), _launch_params(trtp, launch), extra

    @trtp.register(PLUGIN_IDS[2])
    def _apply_desc(q: trtp.TensorDesc, state: trtp.TensorDesc, heads: int, eps: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(PLUGIN_IDS[2])
    def _apply_tune(q: trtp.TensorDesc, state: trtp.TensorDesc, outputs):
        return [trtp.AutoTuneCombination(f"{io_types}, FP32, {io_types}")]

    @trtp.aot_impl(PLUGIN_IDS[2])
    def _apply_aot(q: trtp.TensorDesc, state: trtp.TensorDesc, heads: int, eps: float, outputs, tactic: int):
        dtype = _dtype_name(trt, q.dtype)
        d = _head_dim(q.shape_expr[2], heads)
        t = K.tiling(d)
        b, n = q.shape_expr[0], q.shape_expr[1]
        launch = K.apply_launch(n, b, heads, t, cdiv=trtp.cdiv)
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n), trtp.SymInt32(heads),
                                             trtp.SymInt32(K.eps_bits(eps))])
        return K.apply_kernel(dtype, d), _ptx(dtype, d, arch), _launch_params(trtp, launch), extra

    _registered["arch"] = arch


def _launch_params(trtp, launch: K.Launch):
    params = trtp.KernelLaunchParams()
    params.grid_x, params.grid_y, params.grid_z = launch.grid
    params.block_x, params.block_y, params.block_z = launch.block
    params.shared_mem = launch.shared_mem
    return params


def plugin_record(enabled: bool, arch: str | None = None) -> dict:
    """What engines.json records about the plugin."""
    record = {"names": list(PLUGIN_IDS), "namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION,
              "enabled": enabled, "implementation": "aot" if enabled else "inlined ONNX function"}
    if enabled:
        record["kernel_arch"] = arch
        record["kernel_source"] = f"engines/kernels/{K.SOURCE_NAME}"
    return record
