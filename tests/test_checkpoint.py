import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from linfusion import LinFusion, ModelSourceError, load_pipeline
from linfusion.mount import CheckpointMismatchError


def unet_inputs(pipe, batch=2, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    sample = torch.randn(batch, 4, size, size, generator=g)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = pipe.text_encoder_2.config.projection_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)}
    return sample, torch.tensor([500.0] * batch), text, kwargs


def run_unet(pipe, inputs):
    sample, t, text, kwargs = inputs
    with torch.no_grad():
        return pipe.unet(sample, t, text, **kwargs).sample


def official_keys(modules_list):
    """The key set of an official checkpoint, spelled out from the published layout."""
    keys = set()
    for i, _ in enumerate(modules_list):
        keys |= {f"{i}.to_q.weight", f"{i}.to_k.weight", f"{i}.to_v.weight",
                 f"{i}.to_out.0.weight", f"{i}.to_out.0.bias"}
        for p in ("to_q_", "to_k_"):
            keys |= {f"{i}.{p}.{j}.{w}" for j in (0, 1, 3) for w in ("weight", "bias")}
    return keys


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
def test_round_trip_in_official_layout(preset, tmp_path):
    loaded = load_pipeline(preset, seed=3)
    loaded.linfusion.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["_class_name"] == "LinFusion"
    assert [sorted(e) for e in config["modules_list"]] == \
        [["dim_n", "heads", "module_name", "projection_mid_dim"]] * len(config["modules_list"])
    state = load_file(tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors")
    assert set(state) == official_keys(config["modules_list"])
    expected = run_unet(loaded.pipeline, unet_inputs(loaded.pipeline))

    fresh = load_pipeline(preset, seed=4, linfusion=str(tmp_path / "ckpt"))
    other = load_pipeline(preset, seed=4)
    torch.testing.assert_close(fresh.pipeline.unet.state_dict(), {
        **other.pipeline.unet.state_dict(),
        **{k: v for k, v in loaded.pipeline.unet.state_dict().items() if ".attn1." in k}})
    fresh.pipeline.unet.load_state_dict(loaded.pipeline.unet.state_dict())
    assert torch.equal(run_unet(fresh.pipeline, unet_inputs(fresh.pipeline)), expected)
    # Saving the loaded checkpoint again reproduces the files byte for byte.
    fresh.linfusion.save_pretrained(tmp_path / "again")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "ckpt" / name).read_bytes()


def test_hand_written_official_checkpoint_lands_in_the_right_layers(tmp_path, tiny_sd):
    unet = tiny_sd.pipeline.unet
    names = [e["module_name"] for e in tiny_sd.linfusion.modules_list]
    entries, state = [], {}
    for i, name in enumerate(names):
        dim = unet.get_submodule(name).to_q.weight.shape[0]
        mid = dim // 4 if i % 2 else None
        m = mid or dim
        entries.append({"module_name": name, "dim_n": dim, "heads": 1, "projection_mid_dim": mid})
        shapes = {"to_q.weight": (dim, dim), "to_k.weight": (dim, dim), "to_v.weight": (dim, dim),
                  "to_out.0.weight": (dim, dim), "to_out.0.bias": (dim,)}
        for p in ("to_q_", "to_k_"):
            shapes |= {f"{p}.0.weight": (m, dim), f"{p}.0.bias": (m,), f"{p}.1.weight": (m,),
                       f"{p}.1.bias": (m,), f"{p}.3.weight": (dim, m), f"{p}.3.bias": (dim,)}
        state |= {f"{i}.{k}": torch.full(s, float(i) + 0.01 * j) for j, (k, s) in enumerate(shapes.items())}
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "LinFusion", "modules_list": entries}))
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))

    loaded = load_pipeline("tiny-sd", linfusion=str(tmp_path))
    unet = loaded.pipeline.unet
    for i, name in enumerate(names):
        layer = unet.get_submodule(name)
        assert layer.heads == 1
        assert torch.equal(layer.to_k_[3].bias, state[f"{i}.to_k_.3.bias"])
        assert torch.equal(layer.to_out[0].weight, state[f"{i}.to_out.0.weight"])
        assert layer.to_q_[0].out_features == (entries[i]["projection_mid_dim"] or entries[i]["dim_n"])


def write_checkpoint(folder, modules_list, state=None):
    folder.mkdir(parents=True, exist_ok=True)
    model = LinFusion(modules_list)
    model.save_pretrained(folder)
    return folder


def test_sdxl_checkpoint_on_sd_unet_names_the_missing_layer(tmp_path, tiny_sd, tiny_sdxl):
    ckpt = write_checkpoint(tmp_path / "xl", tiny_sdxl.linfusion.modules_list)
    sd_names = {e["module_name"] for e in tiny_sd.linfusion.modules_list}
    first = next(e["module_name"] for e in tiny_sdxl.linfusion.modules_list if e["module_name"] not in sd_names)
    with pytest.raises(CheckpointMismatchError, match=f"'{first}'"):
        LinFusion.from_pretrained(ckpt).mount(load_pipeline("tiny-sd").pipeline.unet)


def test_width_mismatch_is_named(tmp_path, tiny_sd):
    entries = [dict(e) for e in tiny_sd.linfusion.modules_list]
    entries[2]["dim_n"] *= 2
    ckpt = write_checkpoint(tmp_path / "wide", entries)
    with pytest.raises(CheckpointMismatchError, match=rf"entry 2 '{entries[2]['module_name']}' has width"):
        LinFusion.from_pretrained(ckpt).mount(load_pipeline("tiny-sd").pipeline.unet)


def test_partial_checkpoint_is_refused(tmp_path, tiny_sd):
    entries = tiny_sd.linfusion.modules_list[:-1]
    ckpt = write_checkpoint(tmp_path / "partial", entries)
    missing = tiny_sd.linfusion.modules_list[-1]["module_name"]
    unet = load_pipeline("tiny-sd").pipeline.unet
    before = unet.get_submodule(missing)
    with pytest.raises(CheckpointMismatchError, match=f"no entry for .*'{missing}'"):
        LinFusion.from_pretrained(ckpt).mount(unet)
    assert unet.get_submodule(missing) is before  # nothing was mounted


def test_cross_attention_is_not_a_target(tmp_path, tiny_sd):
    entries = [dict(e) for e in tiny_sd.linfusion.modules_list]
    entries[0]["module_name"] = entries[0]["module_name"].replace("attn1", "attn2")
    ckpt = write_checkpoint(tmp_path / "attn2", entries)
    with pytest.raises(CheckpointMismatchError, match="is not a self-attention layer"):
        LinFusion.from_pretrained(ckpt).mount(load_pipeline("tiny-sd").pipeline.unet)


def test_only_safetensors_are_read(tmp_path, tiny_sd):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_sd.linfusion.config))
    torch.save(tiny_sd.linfusion.state_dict(), folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="diffusion_pytorch_model.safetensors"):
        LinFusion.from_pretrained(folder)


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "config.json").write_text("{not json"), "not a LinFusion config"),
    (lambda d: (d / "config.json").write_text('{"modules_list": [{"dim_n": 4}]}'), "malformed"),
    (lambda d: (d / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 20), "cannot read"),
])
def test_corrupt_checkpoints_get_clear_errors(tmp_path, tiny_sd, damage, message):
    ckpt = write_checkpoint(tmp_path / "c", tiny_sd.linfusion.modules_list)
    damage(ckpt)
    with pytest.raises(ModelSourceError, match=message):
        LinFusion.from_pretrained(ckpt)


def test_weights_not_matching_config_are_refused(tmp_path, tiny_sd):
    ckpt = write_checkpoint(tmp_path / "c", tiny_sd.linfusion.modules_list)
    entries = [dict(e) for e in tiny_sd.linfusion.modules_list]
    entries[1]["projection_mid_dim"] = 3
    (ckpt / "config.json").write_text(json.dumps({"modules_list": entries}))
    with pytest.raises(ModelSourceError, match="1.to_q_.0.weight"):
        LinFusion.from_pretrained(ckpt)
