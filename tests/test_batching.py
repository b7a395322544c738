"""Dynamic batching (runtime/batching.py): each image of a batch equals the request run alone."""

import numpy as np
import pytest
from PIL import Image
from torchless import run_without_torch

PROMPTS = [("a watercolor fox in the snow", None, 11, 1),
           ("a red lighthouse on a cliff at dusk", "blurry, low quality", 22, 2),
           ("an isometric city block", "", 33, 1)]


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.fixture(scope="module")
def pipe(exported):
    from linfusion.runtime import Pipeline

    return Pipeline.from_export(exported("tiny-sd"), backend="onnxruntime")


def request(prompt, negative, seed, images=1, **kw):
    from linfusion.runtime.request import GenerationRequest

    settings = {"height": 64, "width": 64, "num_inference_steps": 4, "output_type": "np", **kw}
    return GenerationRequest(prompt=prompt, negative_prompt=negative, seed=seed, num_images_per_prompt=images,
                             **settings)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
def test_batch_equals_each_request_alone(pipe, scheduler):
    from linfusion.runtime.batching import generate_batch

    requests = [request(*row, scheduler=scheduler) for row in PROMPTS]
    outputs = generate_batch(pipe, requests)
    assert [o.seed for o in outputs] == [11, 22, 33]
    assert [len(o.images) for o in outputs] == [1, 2, 1]
    for req, out in zip(requests, outputs):
        alone = pipe.generate(req)
        assert out.images.shape == alone.images.shape
        assert psnr(out.images, alone.images) >= 50, (scheduler, req.seed, psnr(out.images, alone.images))
        assert out.timings["batch"] == 4
    # Different seeds and prompts give different images: the comparison above is not vacuous.
    assert psnr(outputs[0].images[0], outputs[2].images[0]) < 30


def test_img2img_batch_equals_each_request_alone(pipe):
    from linfusion.runtime.batching import generate_batch

    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    requests = [request(f"prompt {i}", None, 40 + i, image=images[i], strength=0.6, scheduler="euler_a",
                        height=None, width=None, num_inference_steps=5) for i in range(2)]
    for req, out in zip(requests, generate_batch(pipe, requests)):
        assert psnr(out.images, pipe.generate(req).images) >= 50


def test_interrupt_stops_before_the_next_step(pipe):
    import threading

    from linfusion.runtime.batching import generate_batch

    stop = threading.Event()
    seen = []

    def callback(step, total):
        seen.append(step)
        if step == 2:
            stop.set()

    (out,) = generate_batch(pipe, [request("a fox", None, 1)], callback=callback, interrupt=stop)
    assert seen == [1, 2] and out.timings["steps_run"] == 2
    assert out.images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("change, word", [({"height": 96}, "height"), ({"num_inference_steps": 3}, "steps"),
                                          ({"scheduler": "ddim"}, "scheduler"),
                                          ({"guidance_scale": 3.0}, "guidance_scale"),
                                          ({"guidance_rescale": 0.5}, "guidance_rescale")])
def test_incompatible_requests_are_refused(pipe, change, word):
    from linfusion.runtime.batching import generate_batch
    from linfusion.runtime.request import GenerationError

    base = {"scheduler": "euler"}
    with pytest.raises(GenerationError, match=word) as info:
        generate_batch(pipe, [request("a", None, 1, **base), request("b", None, 2, **{**base, **change})])
    assert "\n" not in str(info.value)


def test_invalid_request_in_a_batch_is_refused_before_any_model_runs(pipe):
    from linfusion.runtime.batching import generate_batch
    from linfusion.runtime.request import GenerationError

    with pytest.raises(GenerationError, match="num_inference_steps"):
        generate_batch(pipe, [request("a", None, 1), request("b", None, 2, num_inference_steps=0)])


def test_batching_is_torch_free():
    result = run_without_torch("""
        import linfusion.runtime.batching
        assert_torch_free()
    """)
    assert result.returncode == 0, result.stderr
