"""Hub lookups without a usable hub: fail fast with one API-worded line, or load from the cache.

huggingface_hub reads HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE when it is imported, so every
scenario runs in a fresh Python process with its own environment. Only loopback is used: a
closed port, and a server that accepts connections but never answers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

BOUND_S = 5.0
"""The longest a failing hub lookup may take (the issue's requirement)."""
CLI_FLAG = re.compile(r"(?<![\w-])--[a-z]")
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Imports come before the clock starts: the timings cover the lookups only. Each call probes
# the hub afresh (the probe cache is cleared), so every call is bounded on its own.
CHILD = r"""
import json, sys, time, warnings
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from safetensors.torch import save_file
from linfusion import LinFusion, ModelSourceError, hub, load_pipeline

def saved(module, path):
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
    return True

results = []
for expr in json.loads(sys.argv[1]):
    getattr(hub, "_PROBES", {}).clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        value, error = None, None
        try:
            value = eval(expr)
        except ModelSourceError as exc:
            error = {"type": type(exc).__name__, "message": str(exc),
                     "cli_hint": getattr(exc, "cli_hint", None)}
        elapsed = time.perf_counter() - start
    results.append({"expr": expr, "elapsed": elapsed, "value": value, "error": error,
                    "warnings": [str(w.message) for w in caught]})
print(json.dumps(results))
"""


def run_child(exprs: list[str], hf_home: Path, endpoint: str, offline: bool = False,
              timeout: float = 120) -> tuple[list[dict], str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "TRANSFORMERS_")) and "proxy" not in k.lower()}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(exprs)], env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the lookups {exprs} did not finish within {timeout} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_server():
    """A loopback server that accepts connections and never answers: (endpoint, accepted sockets)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    stop, accepted = threading.Event(), []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)  # held open, never read or answered

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        server.close()


def check_fast_api_error(result: dict, bound: float = BOUND_S) -> str:
    assert result["error"] is not None, f"{result['expr']} did not fail"
    message = result["error"]["message"]
    assert result["elapsed"] < bound, f"{result['expr']} took {result['elapsed']:.1f} s: {message}"
    assert "\n" not in message and message.strip() == message
    assert not CLI_FLAG.search(message), f"a CLI flag in a Python API error: {message}"
    assert "not in the local hub cache" in message and "local folder" in message
    return message


def test_closed_port_fails_fast_with_an_api_remedy(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    results, stderr = run_child(["LinFusion.from_pretrained('Yuanshi/LinFusion-XL')", "load_pipeline('sdxl')",
                                 "load_pipeline('someone/not-cached')"], tmp_path / "hf", endpoint)
    checkpoint, preset, hub_id = (check_fast_api_error(r) for r in results)
    assert endpoint in checkpoint and "LinFusion.from_unet" in checkpoint
    assert "random_weights=True" in preset and "stabilityai/stable-diffusion-xl-base-1.0" in preset
    assert "--random-weights" in results[1]["error"]["cli_hint"]
    assert "someone/not-cached" in hub_id
    assert "Retrying" not in stderr, stderr


def test_silent_server_fails_within_the_bound(tmp_path, silent_server):
    endpoint, accepted = silent_server
    results, stderr = run_child(["LinFusion.from_pretrained('Yuanshi/LinFusion-XL')", "load_pipeline('sdxl')"],
                                tmp_path / "hf", endpoint)
    for result in results:
        assert endpoint in check_fast_api_error(result)
    assert accepted, "nothing connected to HF_ENDPOINT: the hub that was asked is not the configured one"
    assert "Retrying" not in stderr, stderr


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "local_files_only"])
def test_offline_mode_fails_immediately_without_connecting(tmp_path, silent_server, how):
    endpoint, accepted = silent_server
    flag = ", local_files_only=True" if how == "local_files_only" else ""
    results, _ = run_child([f"LinFusion.from_pretrained('Yuanshi/LinFusion-XL'{flag})",
                            f"load_pipeline('sdxl'{flag})"], tmp_path / "hf", endpoint,
                           offline=how == "HF_HUB_OFFLINE")
    for result in results:
        assert how in check_fast_api_error(result, bound=1.0)
    assert not accepted, "offline mode connected to the hub"


def put_in_hub_cache(hf_home: Path, repo_id: str, folder: Path) -> None:
    """The hub cache layout: refs/main names a snapshot folder that holds the repo's files."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_cached_models_load_without_the_hub(tmp_path, hub):
    from linfusion import LinFusion
    from linfusion.presets import build_random_pipeline, get_preset

    pipe = build_random_pipeline(get_preset("tiny-sd"), seed=3)
    torch.manual_seed(4)
    lf = LinFusion.from_unet(pipe.unet)
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    lf.save_pretrained(tmp_path / "lf")
    hf_home = tmp_path / "hf"
    put_in_hub_cache(hf_home, "someone/tiny-sd", tmp_path / "pipe")
    put_in_hub_cache(hf_home, "someone/tiny-linfusion", tmp_path / "lf")

    out = tmp_path / "out"
    out.mkdir()
    load = "load_pipeline('someone/tiny-sd', linfusion='someone/tiny-linfusion', dtype=torch.float16)"
    results, _ = run_child([
        f"saved(LinFusion.from_pretrained('someone/tiny-linfusion'), {str(out / 'lf.safetensors')!r})",
        f"saved({load}.pipeline.unet, {str(out / 'unet.safetensors')!r})",
    ], hf_home, f"http://127.0.0.1:{closed_port()}", offline=hub == "offline")
    for result in results:
        assert result["error"] is None, result
        assert result["elapsed"] < BOUND_S, result
        assert not [w for w in result["warnings"] if "torch_dtype" in w], result["warnings"]

    loaded_lf = load_file(out / "lf.safetensors")
    assert loaded_lf.keys() == lf.state_dict().keys()
    assert all(torch.equal(loaded_lf[k], v) for k, v in lf.state_dict().items())
    # The loaded UNet is the cached one in fp16, with the cached LinFusion layers mounted.
    unet = load_file(out / "unet.safetensors")
    assert unet["conv_in.weight"].dtype == torch.float16
    assert torch.equal(unet["conv_in.weight"], pipe.unet.conv_in.weight.half())
    mounted = {f"{name}.{k}": v for name, layer in lf.layers().items() for k, v in layer.state_dict().items()}
    assert mounted and all(torch.equal(unet[k], v.half()) for k, v in mounted.items())


@pytest.mark.parametrize("version, name", [("0.30.0", "torch_dtype"), ("0.39.2", "torch_dtype"),
                                           ("0.40.0", "dtype"), ("0.42.1", "dtype")])
def test_dtype_argument_follows_the_diffusers_version(monkeypatch, version, name):
    """diffusers 0.40 added ``dtype`` and deprecated ``torch_dtype``; older ones ignore ``dtype``."""
    import diffusers

    from linfusion.loader import dtype_kwarg

    monkeypatch.setattr(diffusers, "__version__", version)
    assert dtype_kwarg(torch.float16) == {name: torch.float16}
