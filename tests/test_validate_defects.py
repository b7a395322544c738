"""Planted defects: validation must fail, and point at the component and layer that is wrong.

Each test damages a copy of a correct export the way a real bug would, then validates it with
``--checksums report`` (the damage changes the files the manifest records) and checks where the
report points. The correct exports pass in test_validate.py, so these failures are the defects'.
"""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from linfusion.export.validation.cli import main

FIRST_LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
EPS_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"


def copy_export(source, tmp_path):
    target = tmp_path / "damaged"
    shutil.copytree(source, target)
    return target


def edit_unet(directory, edit):
    path = directory / "unet" / "model.onnx"
    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(path))


def validate(directory, tmp_path, *args):
    report = tmp_path / "report.json"
    code = main([str(directory), "--checksums", "report", "--report", str(report), *args])
    return code, json.loads(report.read_text())


def failed_components(report):
    return {c["component"] for c in report["checks"] if c["status"] != "passed"}


def perturb_weight(model):
    """The largest weight tensor, with noise of 5% of its spread added (a corrupted or wrong weight)."""
    largest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(largest)
    noise = np.random.default_rng(0).standard_normal(weights.shape) * 0.05 * weights.std()
    largest.CopyFrom(numpy_helper.from_array((weights + noise).astype(weights.dtype), largest.name))


def freeze_token_count(tokens):
    """The LinearAttention function's N as a constant: the scale frozen at one resolution."""
    def edit(model):
        (function,) = [f for f in model.functions if f.name == "LinearAttention"]
        index = next(i for i, node in enumerate(function.node) if list(node.output) == ["tokens_1d"])
        function.node[index].CopyFrom(helper.make_node(
            "Constant", [], ["tokens_1d"], value=numpy_helper.from_array(np.array([tokens], np.int64))))
    return edit


def set_eps(layer, eps):
    def edit(model):
        node = next(n for n in model.graph.node if n.name == layer)
        attribute = next(a for a in node.attribute if a.name == "eps")
        attribute.f = eps
    return edit


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_perturbed_unet_weight_fails_on_the_unet(exported, tmp_path, capsys, precision):
    damaged = copy_export(exported("tiny-sd", precision), tmp_path)
    edit_unet(damaged, perturb_weight)
    code, report = validate(damaged, tmp_path, "--sizes", "64x64", "--components", "text_encoder,unet")
    assert code == 1 and not report["passed"]
    assert failed_components(report) == {"unet"}
    assert report["checksums"]["mismatched"] == ["unet/model.onnx"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("FAILED: unet on onnxruntime (3 of 3 cases")


def test_scale_frozen_at_the_trace_resolution_names_the_first_attention_layer(exported, tmp_path, capsys):
    """Traced at a 12x8 latent (96 tokens in the first attention level), validated at 8x8 (64 tokens)."""
    damaged = copy_export(exported("tiny-sd"), tmp_path)
    edit_unet(damaged, freeze_token_count(96))
    code, report = validate(damaged, tmp_path, "--sizes", "64x64", "--components", "unet")
    assert code == 1 and failed_components(report) == {"unet"}
    (where,) = report["localisations"]
    assert where["first_divergent"] == FIRST_LAYER
    assert f"layer {FIRST_LAYER} diverges first" in capsys.readouterr().out.strip().splitlines()[-1]


def test_frozen_scale_at_the_trace_size_diverges_one_level_down(exported, tmp_path):
    """At the trace size the first level's N happens to be right; the next level's is not."""
    damaged = copy_export(exported("tiny-sd"), tmp_path)
    edit_unet(damaged, freeze_token_count(96))
    code, report = validate(damaged, tmp_path, "--sizes", "96x64", "--components", "unet")
    (where,) = report["localisations"]
    assert code == 1 and where["first_divergent"] == "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert [layer["passed"] for layer in where["layers"]][:2] == [True, False]


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
def test_wrong_eps_on_one_node_names_that_layer(exported, tmp_path, preset):
    damaged = copy_export(exported(preset), tmp_path)
    edit_unet(damaged, set_eps(EPS_LAYER, 1.0))
    code, report = validate(damaged, tmp_path, "--sizes", "64x64", "--components", "unet")
    assert code == 1 and failed_components(report) == {"unet"}
    (where,) = report["localisations"]
    assert where["first_divergent"] == EPS_LAYER
    before = [layer for layer in where["layers"]][:[x["layer"] for x in where["layers"]].index(EPS_LAYER)]
    assert before and all(layer["passed"] for layer in before)


def test_swapped_text_encoders_fail_on_both_encoders(exported, tmp_path, capsys):
    damaged = copy_export(exported("tiny-sdxl"), tmp_path)
    one, two = damaged / "text_encoder" / "model.onnx", damaged / "text_encoder_2" / "model.onnx"
    one.rename(tmp_path / "swap.onnx")
    two.rename(one)
    (tmp_path / "swap.onnx").rename(two)
    code, report = validate(damaged, tmp_path, "--components", "text_encoder,text_encoder_2,vae_decoder",
                            "--sizes", "64x64")
    assert code == 1
    assert failed_components(report) == {"text_encoder", "text_encoder_2"}
    assert "text_embeds" in next(c["reason"] for c in report["checks"] if c["component"] == "text_encoder_2")
    assert "text_encoder on onnxruntime" in capsys.readouterr().out.strip().splitlines()[-1]


def test_text_encoder_from_another_seed_fails_on_that_encoder(exported, tmp_path):
    """Same graph, other weights: only the numbers can tell."""
    from linfusion import load_pipeline
    from linfusion.export.exporter import export_pipeline

    other = tmp_path / "other"
    export_pipeline(load_pipeline("tiny-sdxl", seed=1), other, components=["text_encoder_2"],
                    progress=lambda line: None)
    damaged = copy_export(exported("tiny-sdxl"), tmp_path)
    shutil.copy(other / "text_encoder_2" / "model.onnx", damaged / "text_encoder_2" / "model.onnx")
    code, report = validate(damaged, tmp_path, "--components", "text_encoder,text_encoder_2")
    assert code == 1 and failed_components(report) == {"text_encoder_2"}
    worst = next(c for c in report["checks"] if c["component"] == "text_encoder_2")["outputs"]
    assert all(o["outside"] > 0.5 and o["cosine"] < 0.9 for o in worst)


def test_defect_is_localised_from_a_saved_reference_without_torch(exported, tmp_path):
    """The GPU-machine path: reference layers come from the file, the comparison runs torch-free."""
    from test_validate import validate_without_torch

    reference = tmp_path / "ref"
    assert main([str(exported("tiny-sd")), "--sizes", "64x64", "--components", "unet",
                 "--save-reference", str(reference)]) == 0
    damaged = copy_export(exported("tiny-sd"), tmp_path)
    edit_unet(damaged, freeze_token_count(96))
    report = tmp_path / "r.json"
    result = validate_without_torch([damaged, "--load-reference", reference, "--checksums", "report",
                                "--report", report])
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"layer {FIRST_LAYER} diverges first" in result.stdout.strip().splitlines()[-1]
    assert json.loads(report.read_text())["localisations"][0]["first_divergent"] == FIRST_LAYER
