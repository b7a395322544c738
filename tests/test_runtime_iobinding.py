"""ONNX Runtime I/O binding in the denoising loop, on the CPU provider (the CUDA path is the same code)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def pipes(exported):
    from linfusion.runtime import Pipeline

    folder = exported("tiny-sdxl")
    return (Pipeline.from_export(folder, providers=["CPUExecutionProvider"], io_binding=True),
            Pipeline.from_export(folder, providers=["CPUExecutionProvider"], io_binding=False))


@pytest.mark.parametrize("cfg_mode", ["batched", "sequential"])
def test_bound_loop_gives_the_same_image(pipes, cfg_mode):
    bound, plain = pipes
    kwargs = dict(num_inference_steps=3, seed=11, output_type="np", height=64, width=96, cfg_mode=cfg_mode,
                  scheduler="euler_a", num_images_per_prompt=2)
    a = bound("a lighthouse", **kwargs).images
    b = plain("a lighthouse", **kwargs).images
    np.testing.assert_array_equal(a, b)


def test_bound_loop_uploads_the_conditioning_once_and_reuses_the_output_buffer(pipes, monkeypatch):
    import onnxruntime as ort
    from linfusion.runtime.backends import onnxruntime as backend

    bound, _ = pipes
    uploads, runs, buffers = [], [], []
    real_upload = ort.OrtValue.ortvalue_from_numpy
    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy",
                        staticmethod(lambda *a, **k: uploads.append(a[0].shape) or real_upload(*a, **k)))
    real_output = backend.OrtBoundRunner._output

    def spy_output(self, name, shape):
        value = real_output(self, name, shape)
        buffers.append(id(value))
        return value

    monkeypatch.setattr(backend.OrtBoundRunner, "_output", spy_output)
    session = bound.runners["unet"].session
    real_run = session.run_with_iobinding
    monkeypatch.setattr(session, "run_with_iobinding", lambda b, *a: runs.append(1) or real_run(b, *a),
                        raising=False)
    bound("a lighthouse", num_inference_steps=4, seed=1, output_type="np", height=64, width=64)
    assert len(runs) == 4, "every UNet step goes through I/O binding"
    assert len(uploads) == 3, "encoder_hidden_states, text_embeds, time_ids: uploaded once per generation"
    assert len(buffers) == 4 and len(set(buffers)) == 1, "one output buffer, reused every step"


def test_cuda_provider_options_have_documented_defaults():
    from linfusion.runtime.backends.onnxruntime import provider_list

    listed = provider_list(["CUDAExecutionProvider", "CPUExecutionProvider"],
                           {"CUDAExecutionProvider": {"device_id": 1}})
    name, options = listed[0]
    assert name == "CUDAExecutionProvider" and options["device_id"] == "1"
    assert options["arena_extend_strategy"] == "kSameAsRequested" and options["enable_cuda_graph"] == "0"
    assert listed[1] == "CPUExecutionProvider"
