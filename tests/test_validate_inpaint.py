"""``linfusion-validate --end-to-end`` on an inpainting export (9-channel UNet): the runtime against
diffusers' StableDiffusionInpaintPipeline with the same synthetic init image, mask, latents and seed;
a mask that differs on one side fails; unsupported combinations are one-line errors (exit 2)."""

import importlib
import json
from dataclasses import replace

import numpy as np
import pytest
from linfusion.export.validation import end_to_end
from linfusion.export.validation.cli import main
from linfusion.export.validation.validate import Options
from PIL import Image

validate = importlib.import_module("linfusion.export.validation.validate")  # the module, not the function

PRESET, SIZE = "tiny-sd-inpaint", (96, 64)


def options(export, **fields):
    """The cheapest run that still checks one component: the VAE decoder at one size, batch 1."""
    return Options(export, backends=["onnxruntime"], sizes=[SIZE], batch=1, components=["vae_decoder"],
                   end_to_end=True, **fields)


@pytest.fixture(scope="module")
def saved(inpaint_export, tmp_path_factory):
    """(export, reference file, report) of one PyTorch-reference run that also saved its reference."""
    export, reference = inpaint_export(PRESET), tmp_path_factory.mktemp("reference") / "ref"
    report = validate.validate(options(export, save_reference=reference), progress=lambda line: None)
    return export, reference, report


def runtime_side(monkeypatch, change):
    """The runtime side gets ``change(settings)``; diffusers' side (the saved reference) is untouched."""
    original = end_to_end.runtime_image

    def runtime_image(export_dir, backend, settings, latents, providers=None):
        return original(export_dir, backend, change(settings), latents, providers)

    monkeypatch.setattr(validate, "runtime_image", runtime_image)


def shifted_mask(pixels):
    def change(settings):
        mask = np.roll(np.asarray(settings.mask_image()), pixels, axis=1)
        moved = replace(settings)
        moved.mask_image = lambda: Image.fromarray(mask, "L")
        return moved
    return change


def other_generator_seed(settings):
    """Seed + 1 for the runtime's generator (the VAE posterior draw), the same init image and mask."""
    moved = replace(settings, seed=settings.seed + 1)
    moved.init_image, moved.mask_image = settings.init_image, settings.mask_image
    return moved


@pytest.mark.slow
def test_end_to_end_inpainting_matches_diffusers(saved):
    _, reference, report = saved
    (result,) = report.end_to_end
    assert result.case == end_to_end.INPAINTING and result.error is None, result
    assert result.passed and result.psnr >= 40, result
    assert report.passed, report.summary()
    sidecar = json.loads(reference.with_suffix(".json").read_text())
    assert sidecar["end_to_end"]["settings"]["case"] == end_to_end.INPAINTING
    mask = np.asarray(end_to_end.EndToEndSettings(*SIZE).mask_image())
    assert mask.shape == SIZE[::-1] and 0 < (mask > 127).mean() < 1  # a real mask: some kept, some regenerated


@pytest.mark.slow
@pytest.mark.parametrize("change", [shifted_mask(16), other_generator_seed], ids=["mask", "seed"])
def test_a_change_on_one_side_fails(saved, monkeypatch, change):
    """From the saved reference (no PyTorch run): as saved it passes; with the runtime's mask moved by 16
    pixels, or its generator seeded otherwise (another masked-image posterior draw), the PSNR falls
    below the tolerance."""
    export, reference, _ = saved
    same = validate.validate(options(export, load_reference=reference), progress=lambda line: None)
    assert same.passed and same.end_to_end[0].psnr >= 40, same.summary()
    runtime_side(monkeypatch, change)
    moved = validate.validate(options(export, load_reference=reference), progress=lambda line: None)
    (result,) = moved.end_to_end
    assert not result.passed and not moved.passed
    assert result.case == end_to_end.INPAINTING and result.psnr < 35, result


@pytest.mark.slow
def test_unsupported_combinations_are_one_line_errors(saved, tmp_path, capsys, monkeypatch):
    export, reference, _ = saved
    # a reference whose end-to-end image is text to image, for an inpainting export
    for suffix in (".npz", ".json"):
        (tmp_path / f"t2i{suffix}").write_bytes(reference.with_suffix(suffix).read_bytes())
    sidecar = json.loads((tmp_path / "t2i.json").read_text())
    sidecar["end_to_end"]["settings"]["case"] = end_to_end.TEXT_TO_IMAGE
    (tmp_path / "t2i.json").write_text(json.dumps(sidecar))
    common = [str(export), "--components", "vae_decoder", "--sizes", "96x64", "--batch", "1",
              "--backends", "onnxruntime", "--end-to-end", "--quiet"]
    assert main([*common, "--load-reference", str(tmp_path / "t2i")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs inpainting" in err and "--end-to-end" in err and len(err.splitlines()) == 1, err
    # what the validator did before it knew inpainting: diffusers' inpainting pipeline without an image
    monkeypatch.setattr(validate, "case_for", lambda manifest: end_to_end.TEXT_TO_IMAGE)
    assert main([*common, "--save-reference", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert "StableDiffusionInpaintPipeline" in err and len(err.splitlines()) == 1, err
