"""linfusion-serve: the real server (uvicorn in a subprocess on 127.0.0.1) on a tiny-sd export.

Every loop here is bounded in count and time; every address is loopback. Images are compared with
``Pipeline.generate`` run in this process (an independent code path: no batching, no HTTP, no PNG).
"""

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from torchless import run_without_torch

httpx = pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
pytest.importorskip("prometheus_client", reason="the serve extra (prometheus-client) is not installed")

SMALL = {"size": "64x64", "num_inference_steps": 3}
LONG = {"width": 256, "height": 256, "steps": 150, "seed": 1, "sampler_name": "Euler"}  # seconds, not ms
"""An A1111 job long enough to still be running while a test acts; tests end it with /interrupt."""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, export, log_dir, *options, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"server-{self.port}.log"
        command = [sys.executable, "-m", "linfusion.serve.cli", str(export), "--port", str(self.port), *options]
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def until(self, condition, what, timeout=60, pause=0.05):
        """Poll ``condition()`` until true, at most ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.log()}"
            try:
                if condition():
                    return self
            except httpx.TransportError:
                pass
            time.sleep(pause)
        raise AssertionError(f"{what} not within {timeout}s:\n{self.log()}")

    def wait_ready(self):
        return self.until(lambda: self.client.get("/readyz", timeout=2).status_code == 200, "ready", 180, 0.2)

    def progress(self):
        return self.client.get("/sdapi/v1/progress").json()["state"]

    def wait_running(self):
        return self.until(lambda: self.progress()["sampling_step"] >= 1, "a running job")

    def wait_idle(self):
        return self.until(lambda: self.progress()["job_count"] == 0, "idle")

    def wait_queued(self, images=1):
        return self.until(lambda: self.metric("linfusion_queue_depth") >= images, "a queued request", 30)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def metric(self, name, **labels):
        text = self.client.get("/metrics").text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$"
        found = re.search(pattern, text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def stop(self):
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def export(exported):
    return exported("tiny-sd")


@pytest.fixture(scope="module")
def pipe(export):
    from linfusion.runtime import Pipeline

    return Pipeline.from_export(export, backend="onnxruntime")


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    s = Server(export, tmp_path_factory.mktemp("serve"), "--max-batch", "4", "--batch-wait-ms", "500",
               "--max-body-mb", "1", "--max-steps", "150", "--max-images", "4", "--max-pixels", str(128 * 128))
    yield s.wait_ready()
    s.stop()


@pytest.fixture(scope="module")
def tight(export, tmp_path_factory):
    """One image at a time, one queued: for 503, 504 (X-Request-Timeout), disconnect and interrupt."""
    s = Server(export, tmp_path_factory.mktemp("serve"), "--max-batch", "1", "--max-queue", "1",
               "--request-timeout", "120")
    yield s.wait_ready()
    s.stop()


def png(b64):
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) / 255 - np.asarray(b, np.float64) / 255) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def reference(pipe, **kw):
    from linfusion.runtime.request import GenerationRequest

    return np.asarray(pipe.generate(GenerationRequest(**kw)).images[0])


def assert_error(response, status, word):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type"}
    assert "\n" not in body["error"]["message"] and word in body["error"]["message"], body


def test_probes_metadata_and_metrics(server):
    from linfusion.runtime.schedulers import SCHEDULERS

    c = server.client
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz").json()
    assert ready["status"] == "ready" and ready["backend"] == "onnxruntime"
    models = c.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny-sd-fp32"]
    sd_models = c.get("/sdapi/v1/sd-models").json()
    assert sd_models[0]["model_name"] == "tiny-sd-fp32" and len(sd_models[0]["sha256"]) == 64
    samplers = {s["name"]: s["aliases"][0] for s in c.get("/sdapi/v1/samplers").json()}
    assert {"Euler", "Euler a", "DDIM", "DPM++ 2M", "DPM++ 2M Karras", "LCM"} <= set(samplers)
    assert all(runtime in SCHEDULERS for runtime in samplers.values())
    progress = c.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    assert c.post("/sdapi/v1/interrupt").json() == {}
    assert_error(c.get("/no/such/endpoint"), 404, "no endpoint")
    text = c.get("/metrics").text
    for name in ("linfusion_requests_total", "linfusion_queue_depth", "linfusion_batch_size_bucket",
                 "linfusion_request_latency_seconds_bucket", "linfusion_unet_seconds_per_step_bucket"):
        assert name in text
    assert server.metric("linfusion_requests_total", endpoint="/healthz", status="200") >= 1


def test_openai_images_equal_the_runtime(server, pipe):
    r = server.client.post("/v1/images/generations", json={"prompt": "a fox", "n": 2, "seed": 7, "scheduler": "euler",
                                                           "model": "tiny-sd-fp32", **SMALL})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and [d["seed"] for d in body["data"]] == [7, 8]
    for item in body["data"]:
        image = png(item["b64_json"])
        assert image.shape == (64, 64, 3)
        want = reference(pipe, prompt="a fox", height=64, width=64, num_inference_steps=3, seed=item["seed"],
                         scheduler="euler")
        assert psnr(image, want) >= 50
    assert psnr(png(body["data"][0]["b64_json"]), png(body["data"][1]["b64_json"])) < 40  # seeds differ


def test_openai_refusals(server):
    c = server.client
    assert_error(c.post("/v1/images/generations", json={"prompt": "a", "response_format": "url"}), 400, "b64_json")
    assert_error(c.post("/v1/images/generations", json={"prompt": "a", "model": "dall-e-3"}), 404, "tiny-sd-fp32")
    assert_error(c.post("/v1/images/generations", json={"prompt": "a", "size": "big"}), 400, "size")
    assert_error(c.post("/v1/images/generations", json={"n": 1}), 400, "prompt")
    assert_error(c.post("/v1/images/generations", content=b"{not json"), 400, "JSON")


def test_a1111_txt2img_equals_the_runtime(server, pipe):
    body = {"prompt": "a castle", "negative_prompt": "fog", "steps": 3, "cfg_scale": 5.0, "width": 64,
            "height": 64, "seed": 99, "sampler_name": "Euler a", "batch_size": 2, "restore_faces": False}
    r = server.client.post("/sdapi/v1/txt2img", content=json.dumps(body))  # no Content-Type, as curl -d
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    assert info["all_seeds"] == [99, 100] and info["sampler_name"] == "Euler a" and not info["interrupted"]
    assert out["parameters"]["prompt"] == "a castle"
    for b64, seed in zip(out["images"], info["all_seeds"]):
        want = reference(pipe, prompt="a castle", negative_prompt="fog", height=64, width=64, num_inference_steps=3,
                         guidance_scale=5.0, seed=seed, scheduler="euler_a")
        assert psnr(png(b64), want) >= 50


def test_a1111_img2img_equals_the_runtime(server, pipe):
    rng = np.random.default_rng(3)
    init = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    body = {"prompt": "a boat", "init_images": ["data:image/png;base64," + b64], "denoising_strength": 0.5,
            "steps": 4, "seed": 5, "sampler_name": "DDIM"}
    r = server.client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    want = reference(pipe, prompt="a boat", image=init, strength=0.5, num_inference_steps=4, seed=5,
                     guidance_scale=7.0, scheduler="ddim")
    assert psnr(png(r.json()["images"][0]), want) >= 50
    assert_error(server.client.post("/sdapi/v1/img2img", json={**body, "mask": b64}), 400, "mask")
    assert_error(server.client.post("/sdapi/v1/img2img", json={**body, "init_images": ["!!"]}), 400, "base64")


def test_requests_are_batched_and_each_image_equals_its_unbatched_one(server, pipe):
    jobs = [("a lighthouse", 1), ("a red bicycle", 2), ("a bowl of fruit", 3)]
    results = {}

    def send(prompt, seed):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            results[seed] = c.post("/v1/images/generations", json={"prompt": prompt, "seed": seed,
                                                                   "scheduler": "euler_a", **SMALL})

    threads = [threading.Thread(target=send, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    values = []
    for prompt, seed in jobs:
        r = results[seed]
        assert r.status_code == 200, r.text
        ids = r.headers["x-request-id"]
        line = next(line for line in server.log().splitlines() if f"id={ids}" in line)
        assert "batch=3" in line and "size=64x64" in line and "steps=3" in line and "queue_wait=" in line
        want = reference(pipe, prompt=prompt, height=64, width=64, num_inference_steps=3, seed=seed,
                         scheduler="euler_a")
        values.append(psnr(png(r.json()["data"][0]["b64_json"]), want))
    print(f"PSNR of batched HTTP images against Pipeline.generate alone: {values}")
    assert min(values) >= 50
    assert server.metric("linfusion_batch_size_bucket", le="2.0") < server.metric("linfusion_batch_size_count")


def test_limits_are_refused_before_queuing(server):
    c = server.client
    assert_error(c.post("/v1/images/generations", json={"prompt": "a", "num_inference_steps": 151}), 400, "151")
    assert_error(c.post("/v1/images/generations", json={"prompt": "a", "n": 5}), 400, "5 images")
    assert_error(c.post("/v1/images/generations", json={"prompt": "a", "size": "256x128"}), 400, "pixels")
    assert_error(c.post("/sdapi/v1/txt2img", json={"prompt": "a", "enable_hr": True}), 400, "width and height")
    assert_error(c.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 0}), 400, "num_inference_steps")
    big = {"prompt": "a", "init_images": ["A" * (2 * 2**20)]}
    assert_error(c.post("/sdapi/v1/img2img", json=big), 413, "larger than")
    assert server.metric("linfusion_requests_total", endpoint="/sdapi/v1/img2img", status="413") == 1


def test_api_key(export, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-token\n")
    s = Server(export, tmp_path, "--api-key-file", str(key_file)).wait_ready()  # /readyz needs no token
    try:
        assert s.client.get("/healthz").status_code == 200
        assert_error(s.client.get("/v1/models"), 401, "API key")
        assert_error(s.client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "API key")
        assert_error(s.client.get("/metrics", headers={"Authorization": "Basic s3cret-token"}), 401, "API key")
        assert_error(s.client.post("/sdapi/v1/txt2img", json={"prompt": "a"}), 401, "API key")
        ok = s.client.get("/v1/models", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny-sd-fp32"
        r = s.client.post("/v1/images/generations", headers={"Authorization": "Bearer s3cret-token"},
                          json={"prompt": "a", **SMALL})
        assert r.status_code == 200, r.text
    finally:
        s.stop()


def start_long(server, results, key="long"):
    def run():
        with httpx.Client(base_url=server.url, timeout=180) as c:
            results[key] = c.post("/sdapi/v1/txt2img", json=LONG)

    thread = threading.Thread(target=run)
    thread.start()
    server.wait_running()
    return thread


def test_full_queue_503_and_timeout_504_drop_the_work(tight):
    results = {}
    images_before = tight.metric("linfusion_images_total")
    thread = start_long(tight, results)
    queued = {}
    waiter = threading.Thread(target=lambda: queued.update(r=httpx.post(
        tight.url + "/v1/images/generations", json={"prompt": "b", **SMALL}, timeout=60,
        headers={"X-Request-Timeout": "1.5"})))
    waiter.start()
    tight.wait_queued()
    full = tight.client.post("/v1/images/generations", json={"prompt": "c", **SMALL})
    assert_error(full, 503, "queue is full")
    assert int(full.headers["retry-after"]) >= 1
    waiter.join(60)
    assert_error(queued["r"], 504, "request-timeout")
    assert tight.metric("linfusion_queue_depth") == 0
    assert_error(tight.client.post("/v1/images/generations", json={"prompt": "d"},
                                   headers={"X-Request-Timeout": "soon"}), 400, "X-Request-Timeout")
    tight.client.post("/sdapi/v1/interrupt")
    thread.join(120)
    assert results["long"].status_code == 200 and json.loads(results["long"].json()["info"])["interrupted"]
    tight.wait_idle()
    assert tight.metric("linfusion_images_total") == images_before + 1  # the timed-out request never ran


def test_request_timeout_stops_work_that_outlives_it(export, tmp_path):
    s = Server(export, tmp_path, "--request-timeout", "2").wait_ready()
    try:
        start = time.monotonic()
        assert_error(s.client.post("/sdapi/v1/txt2img", json=LONG), 504, "request-timeout")
        assert time.monotonic() - start < 60
        s.wait_idle()
        assert s.metric("linfusion_images_total") == 0  # nobody was answered an image
        # the abandoned batch stopped at its next step instead of running all 150
        assert s.metric("linfusion_denoise_steps_total") < 150
        assert time.monotonic() - start < 60
    finally:
        s.stop()


def test_disconnected_client_loses_its_queued_work(tight):
    results = {}
    images_before = tight.metric("linfusion_images_total")
    thread = start_long(tight, results)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tight.url + "/v1/images/generations", json={"prompt": "gone", **SMALL}, timeout=1.0)
    tight.until(lambda: tight.metric("linfusion_requests_total", endpoint="/v1/images/generations",
                                     status="499") >= 1, "the disconnect", 10)
    assert tight.metric("linfusion_queue_depth") == 0
    tight.client.post("/sdapi/v1/interrupt")
    thread.join(120)
    assert results["long"].status_code == 200
    tight.wait_idle()
    assert tight.metric("linfusion_images_total") == images_before + 1


def test_interrupt_returns_the_running_job_early(tight):
    results = {}
    start = time.monotonic()
    thread = start_long(tight, results)
    progress = tight.client.get("/sdapi/v1/progress").json()
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
    assert tight.client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(120)
    info = json.loads(results["long"].json()["info"])
    image = png(results["long"].json()["images"][0])
    assert info["interrupted"] and image.shape == (LONG["height"], LONG["width"], 3)
    assert time.monotonic() - start < 120


def test_sigterm_drains_then_exits_0(export, tmp_path):
    s = Server(export, tmp_path, "--max-batch", "1", "--drain-timeout", "120").wait_ready()
    try:
        results = {}
        body = {"prompt": "drain", "width": 128, "height": 128, "steps": 40, "seed": 3}
        first = threading.Thread(target=lambda: results.update(a=httpx.post(
            s.url + "/sdapi/v1/txt2img", json=body, timeout=180)))
        first.start()
        s.wait_running()
        second = threading.Thread(target=lambda: results.update(b=httpx.post(
            s.url + "/v1/images/generations", json={"prompt": "queued", **SMALL}, timeout=180)))
        second.start()
        s.wait_queued()
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert_error(s.client.post("/v1/images/generations", json={"prompt": "late", **SMALL}), 503, "shutting down")
        assert s.client.get("/readyz").status_code == 503
        first.join(180)
        second.join(180)
        assert results["a"].status_code == 200, results["a"].text  # in flight at SIGTERM
        assert not json.loads(results["a"].json()["info"])["interrupted"]
        assert results["b"].status_code == 200, results["b"].text  # queued at SIGTERM
        assert s.proc.wait(60) == 0
        assert "draining" in s.log()
    finally:
        s.stop()


def test_a_broken_export_makes_the_server_exit_1(tmp_path):
    (tmp_path / "empty-export").mkdir()
    s = Server(tmp_path / "empty-export", tmp_path)
    try:
        assert s.proc.wait(120) == 1
        errors = [line for line in s.log().splitlines() if "cannot load" in line]
        assert len(errors) == 1 and str(tmp_path / "empty-export") in errors[0]
    finally:
        s.stop()


def test_config_and_help(tmp_path, monkeypatch):
    from linfusion.serve.config import ConfigError, from_args, parser

    monkeypatch.delenv("LINFUSION_API_KEY", raising=False)
    config = from_args(["exports/x"])
    assert config.host == "127.0.0.1" and config.api_key is None and config.max_batch == 4
    monkeypatch.setenv("LINFUSION_API_KEY", "k1")
    assert from_args(["exports/x", "--host", "0.0.0.0"]).api_key == "k1"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        from_args(["exports/x", "--api-key-file", str(tmp_path / "empty")])
    text = parser().format_help()
    for option in ("--host", "--port", "--backend", "--max-batch", "--batch-wait-ms", "--max-queue",
                   "--request-timeout", "--max-pixels", "--max-steps", "--max-images", "--api-key-file",
                   "--drain-timeout"):
        assert option in text
    assert text.count("(default:") >= 12


def test_serve_is_torch_free(tmp_path):
    result = run_without_torch(f"""
        from linfusion.serve import ServeConfig, create_app
        import linfusion.serve.cli, linfusion.serve.batcher
        app = create_app(ServeConfig({str(tmp_path)!r}))  # the model loads at startup, not here
        try:
            import ray.serve
        except ImportError:
            pass
        else:
            import linfusion.serve.ray
        assert_torch_free()
    """)
    assert result.returncode == 0, result.stderr


RAY_SCRIPT = """
import json, sys, httpx, ray
from ray import serve
from linfusion.serve.ray import build

export, port, result = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
try:
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"directory": export, "max_batch": 2}, num_replicas=2, num_cpus=0.5), route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    instances = set()
    for _ in range(60):
        instances.add(httpx.get(url + "/readyz", timeout=30).json()["instance"])
        if len(instances) == 2:
            break
    body = {"prompt": "a fox", "seed": 4, "size": "64x64", "num_inference_steps": 3, "scheduler": "euler"}
    image = httpx.post(url + "/v1/images/generations", json=body, timeout=300)
    with open(result, "w") as f:
        json.dump({"instances": len(instances), "status": image.status_code, "body": image.json(),
                   "models": httpx.get(url + "/v1/models", timeout=30).json(),
                   "samplers": httpx.get(url + "/sdapi/v1/samplers", timeout=30).status_code}, f)
finally:
    serve.shutdown()
    ray.shutdown()
"""


@pytest.mark.slow
def test_ray_serve_two_local_replicas(export, pipe, tmp_path):
    """Two replicas on a local Ray cluster (CPU): both answer, and an image equals the runtime's."""
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]'); "
                                            "linfusion.serve.ray is untested here")
    result = subprocess.run([sys.executable, "-c", RAY_SCRIPT, str(export), str(free_port()), str(tmp_path / "out")],
                            check=False, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads((tmp_path / "out").read_text())
    assert out["instances"] == 2 and out["samplers"] == 200
    assert out["models"]["data"][0]["id"] == "tiny-sd-fp32"
    assert out["status"] == 200, out["body"]
    want = reference(pipe, prompt="a fox", height=64, width=64, num_inference_steps=3, seed=4, scheduler="euler")
    assert psnr(png(out["body"]["data"][0]["b64_json"]), want) >= 50
