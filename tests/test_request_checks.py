"""Every number of a request is finite and in range, refused in one line before any model runs."""

from __future__ import annotations

import math

import pytest
from linfusion.runtime.request import GenerationError, GenerationRequest, check_numbers, finite, whole


@pytest.mark.parametrize("field,value,message", [
    ("guidance_scale", float("nan"), "guidance_scale must be a finite number"),
    ("guidance_scale", float("inf"), "guidance_scale must be a finite number"),
    ("guidance_scale", -1.0, "guidance_scale must be in [0, inf]"),
    ("guidance_scale", "abc", "guidance_scale must be a number"),
    ("guidance_rescale", 1.5, "guidance_rescale must be in [0, 1]"),
    ("guidance_rescale", float("nan"), "guidance_rescale must be a finite number"),
    ("num_inference_steps", 0, "num_inference_steps must be at least 1"),
    ("num_inference_steps", 2.5, "num_inference_steps must be a whole number"),
    ("num_inference_steps", 10**6, "num_inference_steps must be at most 1000"),
    ("num_images_per_prompt", 0, "num_images_per_prompt must be at least 1"),
    ("seed", -1, "seed must be at least 0"),
    ("seed", 2**64, "seed must be at most"),
    ("seed", True, "seed must be a whole number"),
    ("height", 0, "height must be at least 1"),
    ("width", float("nan"), "width must be a whole number"),
])
def test_bad_numbers(field, value, message):
    request = GenerationRequest("x", **{field: value})
    with pytest.raises(GenerationError, match=message.replace("[", r"\[").replace("(", r"\(")) as info:
        check_numbers(request, 7.5)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf"), 1.0000001])
def test_strength_outside_the_half_open_unit_interval(value):
    with pytest.raises(GenerationError, match="strength"):
        check_numbers(GenerationRequest("x", image=object(), strength=value), 7.5)


@pytest.mark.parametrize("value", [1e-300, 0.5, 1.0])
def test_strength_inside_the_half_open_unit_interval(value):
    assert check_numbers(GenerationRequest("x", image=object(), strength=value), 7.5)["strength"] == value


def test_good_numbers_pass_through():
    checked = check_numbers(GenerationRequest("x", guidance_scale=None, num_inference_steps=3.0, seed=7,
                                              image=object(), strength=1.0), 5.0)
    assert checked["guidance_scale"] == 5.0 and checked["steps"] == 3 and checked["seed"] == 7
    assert checked["strength"] == 1.0
    assert 0 <= check_numbers(GenerationRequest("x"), 7.5)["seed"] < 2**32


def test_helpers_against_hand_values():
    assert finite("a", "0.5", 0, 1) == 0.5
    assert whole("n", 4.0, 1) == 4
    with pytest.raises(GenerationError):
        finite("a", math.nextafter(0.0, -1.0), 0.0)
    with pytest.raises(GenerationError):
        finite("a", 0.0, 0.0, 1.0, low_open=True)


def test_cli_refuses_nan_guidance_before_loading(exported, tmp_path, capsys, monkeypatch):
    """Issue: --guidance nan was accepted and wrote an image."""
    from linfusion.runtime import cli

    out = tmp_path / "o.png"
    code = cli.main([str(exported("tiny-sd")), "--prompt", "x", "--guidance", "nan", "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "guidance_scale must be a finite number" in err and len(err.splitlines()) == 1
    assert not out.exists()
