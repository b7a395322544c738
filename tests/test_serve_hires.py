"""The hires fields of linfusion-serve (OpenAI extensions and A1111's Hires. fix) through the real server.

Each image is compared with ``Pipeline.generate`` on the same ``runtime.hires.Hires`` in this
process (no HTTP, no batching, no PNG); the chain itself is checked against diffusers in
tests/test_hires.py.
"""

import base64
import io

import pytest
import test_serve
from linfusion.runtime.hires import Hires
from PIL import Image
from test_serve import Server, assert_error, png, psnr

pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")
pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")

export, pipe = test_serve.export, test_serve.pipe  # the tiny-sd export and its Pipeline (fixtures)


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    s = Server(export, tmp_path_factory.mktemp("serve-hires"), "--max-batch", "4", "--batch-wait-ms", "50",
               "--max-pixels", str(256 * 256), "--max-steps", "8")
    yield s.wait_ready()
    s.stop()


def chain_image(pipe, hires, **kw):
    from linfusion.runtime.request import GenerationRequest

    request = GenerationRequest(prompt="a red cube on a table", num_inference_steps=4, seed=11, hires=hires, **kw)
    output = pipe.generate(request)
    assert len(output.timings["stages"]) == 1 + len(hires.strengths or (0,))  # the chain really ran
    return output.images[0]


def test_openai_hires_fields(server, pipe):
    body = {"prompt": "a red cube on a table", "size": "128x128", "num_inference_steps": 4, "seed": 11,
            "hires": "auto", "hires_base": "64x64", "hires_strengths": [0.5], "hires_steps": 4}
    response = server.client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    image = png(response.json()["data"][0]["b64_json"])
    assert image.shape == (128, 128, 3)
    want = chain_image(pipe, Hires("auto", (64, 64), (0.5,), 4), width=128, height=128)
    assert psnr(image, want) >= 50
    one_pass = server.client.post("/v1/images/generations", json={**body, "hires": "off"})
    assert psnr(png(one_pass.json()["data"][0]["b64_json"]), want) < 40  # "off" is another image


def test_a1111_hires_fix(server, pipe):
    body = {"prompt": "a red cube on a table", "width": 64, "height": 64, "steps": 4, "seed": 11, "cfg_scale": 7.5,
            "sampler_name": "Euler", "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 4,
            "denoising_strength": 0.5}
    response = server.client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    image = png(response.json()["images"][0])
    assert image.shape == (128, 128, 3)  # width x height is the first pass; hr_scale 2 the result
    want = chain_image(pipe, Hires("auto", (64, 64), (0.5,), 4), width=128, height=128, guidance_scale=7.5,
                       scheduler="euler")
    assert psnr(image, want) >= 50


@pytest.mark.parametrize("body, word", [
    ({"enable_hr": True, "width": 64, "height": 64, "hr_scale": 3}, "must be 2, 4, 8 or 16"),
    ({"enable_hr": True, "width": 64, "height": 64, "hr_resize_x": 128, "hr_resize_y": 192}, "must be 2, 4"),
    ({"enable_hr": True}, "width and height"),
    ({"enable_hr": True, "width": 64, "height": 64, "denoising_strength": 1.5}, "strength"),
    ({"enable_hr": True, "width": 256, "height": 256}, "pixels"),  # 512x512 target: above --max-pixels
])
def test_a1111_hires_refusals(server, body, word):
    assert_error(server.client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 4, **body}), 400, word)


def test_openai_hires_refusals(server):
    c = server.client
    base = {"prompt": "a", "size": "128x128", "num_inference_steps": 4}
    assert_error(c.post("/v1/images/generations", json={**base, "hires": "sometimes"}), 400, "hires must be")
    assert_error(c.post("/v1/images/generations", json={**base, "hires_base": "96x64"}), 400, "power of two")
    three = {**base, "hires_strengths": [0.5, 0.3, 0.2]}  # 128 / 2**3: a 16 px base, not a multiple of 32
    assert_error(c.post("/v1/images/generations", json=three), 400, "multiples of 32")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    init = {"prompt": "a", "init_images": [base64.b64encode(buffer.getvalue()).decode()], "enable_hr": True,
            "width": 64, "height": 64}
    assert_error(c.post("/sdapi/v1/img2img", json=init), 400, "txt2img")
