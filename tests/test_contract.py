"""The typed export contract: one place for I/O names, the registry, manifest integrity and migration."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from linfusion.runtime.contract import REGISTRY, Role, UNetIO, component_kind, kinds_for
from linfusion.runtime.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
SOURCES = [p for folder in ("runtime", "export", "engines", "linfusion", "benchmarks")
           for p in (ROOT / folder).rglob("*.py")]


@pytest.mark.parametrize("name", ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids",
                                  "out_sample", "latent_sample", "latent_parameters", "input_ids",
                                  "controlnet_cond", "conditioning_scale", "mid_block_residual",
                                  "last_hidden_state", "penultimate_hidden_state"])
def test_io_names_are_spelled_in_one_module(name):
    """An I/O name as a string literal appears only in the contract (plus JSON keys that happen to
    share a generic name, listed here with their reason)."""
    pattern = re.compile(rf"""["']{name}["']""")
    allowed = {ROOT / "runtime/contract/components.py"}
    generic = {  # the same word with another meaning
        "sample": {"runtime/schedulers"},  # prediction_type "sample"
        "timestep": {"export/validation/cases.py"},  # a Case field in reference files
        "controlnet_cond": {"benchmarks/controlnet_cost.py"},  # diffusers' ControlNetModel keyword
    }
    found = set()
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(g) for g in generic.get(name, ())):
            continue
        if pattern.search(path.read_text()):
            found.add(path)
    assert found == allowed, sorted(str(p.relative_to(ROOT)) for p in found - allowed)


def test_unet_input_names_match_what_the_export_holds(exported):
    """Independent check: the ONNX graph's own input names are the contract's."""
    import onnx

    model = onnx.load(str(exported("tiny-sdxl") / "unet" / "model.onnx"), load_external_data=False)
    graph_inputs = [i.name for i in model.graph.input]
    assert graph_inputs == [UNetIO.sample, UNetIO.timestep, UNetIO.encoder_hidden_states, UNetIO.text_embeds,
                            UNetIO.time_ids]
    assert [o.name for o in model.graph.output] == [UNetIO.out_sample]


def test_registry_covers_both_families():
    assert [k.name for k in kinds_for(False)] == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert [k.name for k in kinds_for(True)] == ["text_encoder", "text_encoder_2", "unet", "vae_decoder",
                                                 "vae_encoder"]
    assert {k.role for k in REGISTRY} == set(Role)
    assert component_kind("vae_encoder").deferred and not component_kind("unet").deferred
    with pytest.raises(KeyError, match="unknown component kind"):
        component_kind("no_such_kind")
    # A ControlNet is exported only with --controlnet (not in kinds_for); numbered ones share its kind.
    assert component_kind("controlnet_1") is component_kind("controlnet")
    assert "controlnet" not in [k.name for k in kinds_for(True)]


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
def test_format_1_manifests_migrate(preset, exported):
    """A manifest written by the previous exporter (format 1, saved from commit 44c5732) reads as
    the same typed facts a fresh export records, minus the widths format 1 lacked."""
    old = json.loads((DATA / f"manifest_v1_{preset}.json").read_text())
    assert old["format_version"] == 1
    with pytest.warns(UserWarning, match="format 1"):
        migrated = Manifest.from_dict(old)
    fresh = load_manifest(exported(preset), verify=False)
    assert migrated.pipeline.unet_block_channels is None
    for field in ("kind", "latent_channels", "latent_multiple", "vae_scale_factor", "vae_scaling_factor",
                  "default_size", "text_encoders", "force_zeros_for_empty_prompt", "addition_time_embed_dim"):
        assert getattr(migrated.pipeline, field) == getattr(fresh.pipeline, field), field
    assert {n: c.kind for n, c in migrated.components.items()} == {n: c.kind for n, c in fresh.components.items()}
    assert [c.inputs for c in migrated.components.values()] == [c.inputs for c in fresh.components.values()]
    for part in ("unet", "vae"):
        config = json.loads((ROOT / "linfusion" / "configs" / preset / part / "config.json").read_text())
        assert getattr(fresh.pipeline, f"{part}_block_channels") == tuple(config["block_out_channels"])


def test_a_format_1_export_still_generates(exported, tmp_path):
    """An existing export directory with a format-1 manifest loads through the migration and runs."""
    from linfusion.runtime import Pipeline

    folder = tmp_path / "old"
    shutil.copytree(exported("tiny-sd"), folder)
    current = json.loads((folder / MANIFEST_NAME).read_text())
    old = json.loads((DATA / "manifest_v1_tiny-sd.json").read_text())
    old["files"] = current["files"]  # same layout; this export's own checksums
    (folder / MANIFEST_NAME).write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="format 1"):
        pipe = Pipeline.from_export(folder)
    out = pipe("a red cube", num_inference_steps=2, seed=3, output_type="np", height=64, width=64)
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


@pytest.mark.parametrize("verify", [True, False])
def test_an_edited_manifest_is_refused(exported, tmp_path, verify):
    """Issue: latent multiple 4 -> 3 in linfusion.json went unnoticed and died inside ONNX Runtime."""
    folder = tmp_path / "edited"
    shutil.copytree(exported("tiny-sd"), folder)
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["pipeline"]["latent_multiple"] = 3
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(ManifestError, match="changed after export") as info:
        load_manifest(folder, verify=verify)
    assert "\n" not in str(info.value)


def test_reformatting_the_manifest_is_not_an_edit(exported, tmp_path):
    folder = tmp_path / "reformatted"
    shutil.copytree(exported("tiny-sd"), folder)
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(json.loads(path.read_text()), indent=None, sort_keys=True))
    assert load_manifest(folder).pipeline.latent_multiple == 4


def test_no_verify_still_reports_a_damaged_file_in_one_line(exported, tmp_path):
    """--no-verify skips hashing, not error handling: truncation (size) and same-size damage (ORT)."""
    from linfusion.runtime import Pipeline

    folder = tmp_path / "damaged"
    shutil.copytree(exported("tiny-sd"), folder)
    unet = folder / "unet" / "model.onnx"
    data = unet.read_bytes()
    unet.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="checksum mismatch for unet/model.onnx .* bytes"):
        Pipeline.from_export(folder, verify=False)
    unet.write_bytes(b"\xff" * len(data))  # same size, not a protobuf
    with pytest.raises(ManifestError, match="cannot load unet") as info:
        Pipeline.from_export(folder, verify=False)
    assert "\n" not in str(info.value)
