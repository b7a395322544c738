"""LoRA swap cost on ONNX Runtime CPU: python benchmarks/lora_swap.py EXPORT_DIR [RANK] -> JSON on stdout.

A seeded rank-RANK PEFT LoRA on every attention projection (UNet attn1/attn2 to_q/to_k/to_v/to_out.0, text
encoder self_attn q/k/v/out_proj). Times: prepare (read the file and the base initializers, add the updates
in numpy); per component a plain session from the file (the floor: what any reload costs), a session with
the weights written into an in-memory copy of the model (what set_loras does: lora_onnx.patched_model, external
data from a copy-on-write map), and the add_initializer alternative."""
import json
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
from linfusion.runtime import lora
from linfusion.runtime.lora_onnx import patched_model, read_initializers
from linfusion.runtime.manifest import load_manifest
from safetensors.numpy import save_file

TARGET = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q|k|v|out)_proj)\.weight$")
directory, rank = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 32
manifest = load_manifest(directory, verify=False)
rng = np.random.default_rng(0)
tensors = {}
for name, spec in manifest.components.items():
    if not spec.lora_map:
        continue
    mapping = lora.read_map(directory, spec)
    params = [p for p in mapping if TARGET.search(p)]
    base = read_initializers(directory / spec.path, {mapping[p]["initializers"][0][0] for p in params})
    for p in params:
        first, transposed = mapping[p]["initializers"][0]
        out, inp = base[first].T.shape if transposed else base[first].shape
        tensors[f"{name}.{p[:-7]}.lora_A.weight"] = (rng.standard_normal((rank, inp)) * 0.01).astype(np.float32)
        tensors[f"{name}.{p[:-7]}.lora_B.weight"] = (rng.standard_normal((out, rank)) * 0.01).astype(np.float32)
lora_file = Path(tempfile.mkdtemp()) / "bench_lora.safetensors"
save_file(tensors, str(lora_file))
result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "export": str(directory), "rank": rank, "modules": len(tensors) // 2,
          "lora_mb": round(lora_file.stat().st_size / 2**20, 1), "ort": ort.__version__}


@contextmanager
def timed(key):
    """Wall clock and process CPU time (all threads): the machine is shared, CPU time is the steadier."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    result[key] = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}


def options():
    o = ort.SessionOptions()
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return o


with timed("prepare"):
    update = lora.prepare(directory, manifest, [(lora_file, 0.8)])
for name in ("text_encoder", "unet"):
    path = directory / manifest.components[name].path
    with timed(f"{name}_plain_session"):
        session = ort.InferenceSession(str(path), options(), providers=["CPUExecutionProvider"])
    del session
    o = options()
    values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in update.weights[name].items()}
    for k, v in values.items():
        o.add_initializer(k, v)
    with timed(f"{name}_add_initializer_session"):  # the alternative (loses weights ORT's transformers fold)
        session = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    del session
    with timed(f"{name}_rewrite_in_memory_session"):  # what set_loras does (runtime.lora.onnxruntime_runner)
        model, files = patched_model(path, update.weights[name])
        o = options()
        if files:
            o.add_external_initializers_from_files_in_memory(list(files), list(files.values()),
                                                             [a.size for a in files.values()])
        session = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
    del session, files, model
print(json.dumps(result, indent=1))
