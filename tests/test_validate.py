"""linfusion-validate on correct exports: passes, reports, exit codes, bad input, reference files."""

import json

import numpy as np
import pytest

from torchless import run_without_torch

from linfusion.export.validation.cli import main
from linfusion.export.comparison import IMAGE_TOLERANCES, TOLERANCES, compare_outputs

SIZES = "64x64,96x32"

@pytest.fixture(scope="module")
def validated(exported, tmp_path_factory):
    """validated(preset, precision) -> (exit code, report dict, stdout), run once per module."""
    cache = {}

    def get(preset, precision):
        if (preset, precision) not in cache:
            report = tmp_path_factory.mktemp("reports") / f"{preset}-{precision}.json"
            code, out = run_main([str(exported(preset, precision)), "--sizes", SIZES, "--end-to-end",
                                  "--report", str(report)])
            cache[preset, precision] = (code, json.loads(report.read_text()), out)
        return cache[preset, precision]

    return get


def run_main(argv):
    """main() in process, with its stdout captured."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
def test_correct_exports_pass(validated, preset, precision):
    code, report, out = validated(preset, precision)
    assert code == 0, out
    assert report["passed"] and out.strip().splitlines()[-1].startswith("PASSED")
    components = {"text_encoder", "unet", "vae_decoder", "vae_encoder"} | ({"text_encoder_2"} if "xl" in preset else set())
    assert {c["component"] for c in report["checks"]} == components
    assert all(c["status"] == "passed" and c["backend"] == "onnxruntime" for c in report["checks"])
    unet = [c for c in report["checks"] if c["component"] == "unet"]
    assert len(unet) == 6  # 2 sizes x early, middle, late
    assert {float(c["case"].split("/t")[1]) for c in unet} == {999.0, 500.0, 20.0}
    for check in report["checks"]:
        precision_of = "fp32" if check["component"].startswith("vae") and "xl" in preset else precision
        for o in check["outputs"]:
            assert o["max_rel_error"] <= TOLERANCES[precision_of].max_rel and o["outside"] == 0.0
            assert o["cosine"] >= TOLERANCES[precision_of].cosine and o["finite"]
    (e2e,) = report["end_to_end"]
    assert e2e["passed"] and e2e["psnr"] >= IMAGE_TOLERANCES[precision].psnr


def test_report_says_why_tensorrt_was_skipped_and_what_was_run(validated):
    _, report, out = validated("tiny-sd", "fp32")
    assert {b["name"]: b["available"] for b in report["backends"]} == {"onnxruntime": True, "tensorrt": False}
    trt = next(b for b in report["backends"] if b["name"] == "tensorrt")
    assert "TensorRT" in trt["reason"] and "tensorrt skipped" in out
    assert report["settings"]["sizes"] == [[64, 64], [96, 32]] and report["settings"]["batch"] == 2
    assert report["reference"]["kind"] == "pytorch" and report["reference"]["source"]["model"] == "tiny-sd"
    assert report["tolerances"]["fp16"]["max_rel"] == TOLERANCES["fp16"].max_rel
    assert report["checksums"]["mode"] == "verify" and report["checksums"]["mismatched"] == []
    metrics = report["checks"][0]["outputs"][0]
    assert set(metrics) >= {"max_abs_error", "max_rel_error", "cosine", "outside", "finite", "passed"}
    assert "max rel" in out and "unet" in out and "t=999 (early)" in out  # the table


def test_export_parity_goes_through_the_validation_comparison(exported):
    """The manifest's parity records carry the validation metrics (outside share, per-output verdict)."""
    manifest = json.loads((exported("tiny-sd") / "linfusion.json").read_text())
    unet = manifest["parity"]["unet"]["outputs"][0]
    assert unet["passed"] and unet["outside"] == 0.0 and "cosine" in unet


def test_comparison_metrics_and_verdicts():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    (same,) = compare_outputs({"x": ref}, {"x": ref + 1e-7}, TOLERANCES["fp32"])
    assert same.passed and same.max_rel_error < 1e-6 and same.outside == 0.0
    bad = ref.copy()
    bad[0, 0, 0, :2] += 1.0
    (local,) = compare_outputs({"x": ref}, {"x": bad}, TOLERANCES["fp32"])
    assert not local.passed and local.outside == pytest.approx(2 / ref.size)
    assert local.max_abs_error == pytest.approx(1.0, rel=1e-5)
    assert local.max_rel_error == pytest.approx(local.max_abs_error / np.abs(ref).max(), rel=1e-6)
    nan = ref.copy()
    nan[1, 1, 1, 1] = np.nan
    assert not compare_outputs({"x": ref}, {"x": nan}, TOLERANCES["fp16"])[0].passed
    assert not compare_outputs({"x": ref}, {"x": ref[:1]}, TOLERANCES["fp32"])[0].passed
    (half,) = compare_outputs({"x": ref}, {"x": ref.astype(np.float16)}, TOLERANCES["fp16"])
    assert half.passed and 0 < half.max_rel_error < TOLERANCES["fp16"].max_rel


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "export directory not found"),
    (["{dir}", "--sizes", "64x"], "bad size '64x'"),
    (["{dir}", "--sizes", "64x64,100x64"], "not a multiple of 32 pixels"),
    (["{dir}", "--components", "unet,vae"], "unknown component(s) vae"),
    (["{dir}", "--backends", "onnxruntime,openvino"], "unknown backend(s) openvino"),
    (["{dir}", "--batch", "0"], "--batch must be at least 1"),
    (["{dir}", "--load-reference", "{missing}/ref"], "reference file not found"),
    (["{dir}", "--reference", "tiny-sd", "--load-reference", "{missing}/ref"], "exclude each other"),
])
def test_bad_input_is_one_line_error_with_exit_2(exported, tmp_path, capsys, argv, message):
    directory = exported("tiny-sd")
    argv = [a.format(dir=directory, missing=tmp_path / "nowhere") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("linfusion-validate: error: ") and message in err[-1], err


def test_changed_files_are_refused_unless_checksums_are_reported(exported, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported("tiny-sd"), copy)
    with open(copy / "scheduler" / "scheduler_config.json", "a") as handle:
        handle.write("\n")
    assert main([str(copy), "--components", "text_encoder"]) == 2
    assert "checksum mismatch for scheduler/scheduler_config.json" in capsys.readouterr().err
    report = tmp_path / "r.json"
    assert main([str(copy), "--components", "text_encoder", "--checksums", "report", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["checksums"] == {"mode": "report", "mismatched": ["scheduler/scheduler_config.json"],
                                 "verified": len(json.loads((copy / "linfusion.json").read_text())["files"]) - 1}


@pytest.fixture(scope="module")
def saved_reference(exported, tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "tiny-sd"
    code, out = run_main([str(exported("tiny-sd")), "--sizes", "64x64", "--components", "unet,vae_decoder",
                          "--end-to-end", "--save-reference", str(path)])
    assert code == 0, out
    return path


def validate_without_torch(argv, timeout=300):
    return run_without_torch(f"""
        from linfusion.export.validation.cli import main
        code = main({[str(a) for a in argv]!r})
        assert_torch_free()
        raise SystemExit(code)
    """, timeout=timeout)


def test_saved_reference_is_npz_plus_json(saved_reference):
    sidecar = json.loads(saved_reference.with_suffix(".json").read_text())
    arrays = np.load(saved_reference.with_suffix(".npz"))
    assert sidecar["format"] == "linfusion-validation-reference"
    assert [c["component"] for c in sidecar["cases"]] == ["unet"] * 3 + ["vae_decoder"]
    unet = sidecar["cases"][0]
    assert unet["inputs"] == ["sample", "timestep", "encoder_hidden_states"] and unet["outputs"] == ["out_sample"]
    assert unet["layers"][0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert arrays["0|in|sample"].shape == (2, 4, 8, 8) and arrays["0|out|out_sample"].shape == (2, 4, 8, 8)
    assert sidecar["identity"]["sha256"]["unet/model.onnx"]
    assert sidecar["end_to_end"]["settings"]["width"] == 64 and arrays["e2e|image"].shape == (1, 64, 64, 3)


def test_load_reference_compares_without_torch(exported, saved_reference, tmp_path):
    report = tmp_path / "r.json"
    result = validate_without_torch([exported("tiny-sd"), "--load-reference", saved_reference, "--end-to-end",
                                "--report", report])
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-2000:]
    data = json.loads(report.read_text())
    assert data["reference"]["kind"] == "file" and data["passed"]
    assert [c["status"] for c in data["checks"]] == ["passed"] * 4
    assert data["end_to_end"][0]["passed"]


def test_reference_for_another_export_is_refused(exported, saved_reference, capsys):
    assert main([str(exported("tiny-sd", "fp16")), "--load-reference", str(saved_reference)]) == 2
    assert "was made for a fp32 export" in capsys.readouterr().err
    assert main([str(exported("tiny-sdxl")), "--load-reference", str(saved_reference)]) == 2
    assert "was made for another export" in capsys.readouterr().err
    assert main([str(exported("tiny-sd")), "--load-reference", str(saved_reference), "--sizes", "96x32"]) == 2
    assert "holds sizes 64x64" in capsys.readouterr().err
