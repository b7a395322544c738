"""LoRA files: making them (PEFT on the tiny presets, kohya written from those), reading and refusing them,
and the torch-free key conversion against diffusers' own (the weights diffusers fuses)."""

import json
import pickle
import re

import numpy as np
import pytest
import torch
from linfusion.runtime.lora_keys import LoraError, lora_modules, parse_lora_arg, read_lora_file
from safetensors.numpy import save_file

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in"]
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]


def make_peft_lora(preset, folder, seed=0, unet=True, text=True, scale_b=0.3):
    """A PEFT LoRA for ``preset`` saved by diffusers' save_lora_weights (with its adapter metadata):
    rank 4 / alpha 8 on the UNet's attention, feed-forward and proj_in (rank 2 / alpha 2 on ff.net.2
    through rank_pattern / alpha_pattern), rank 2 / alpha 3 on every text encoder. Returns the path."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from linfusion import load_pipeline

    loaded = load_pipeline(preset)  # a fresh pipeline: injecting adapters changes its modules
    pipe = loaded.pipeline
    unet_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=UNET_TARGETS,
                             rank_pattern={"ff.net.2": 2}, alpha_pattern={"ff.net.2": 2})
    text_config = LoraConfig(r=2, lora_alpha=3, init_lora_weights="gaussian", target_modules=TEXT_TARGETS)
    encoders = ["text_encoder"] + (["text_encoder_2"] if loaded.is_xl else [])
    models = {"unet": (pipe.unet, unet_config)} if unet else {}
    if text:
        models.update({name: (getattr(pipe, name), text_config) for name in encoders})
    generator = torch.Generator().manual_seed(seed)
    kwargs = {}
    for name, (model, config) in models.items():
        inject_adapter_in_model(config, model)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:  # PEFT starts B at zero: make the update non-trivial
                    param.copy_(torch.randn(param.shape, generator=generator) * scale_b)
        kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        kwargs[f"{name}_lora_adapter_metadata"] = config.to_dict()
    cls = StableDiffusionXLPipeline if loaded.is_xl else StableDiffusionPipeline
    cls.save_lora_weights(str(folder), safe_serialization=True, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def sgm_name(module, per_block):
    """diffusers' SD-XL attention block names -> SGM's (kohya's SD-XL files), hand-derived from the layout
    (L layers per down block): input_blocks 1+(L+1)b+a hold down_blocks.b.attentions.a, output_blocks
    (L+1)b+a hold up_blocks.b.attentions.a."""
    down = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", module)
    if down:
        return f"input_blocks.{1 + (per_block + 1) * int(down[1]) + int(down[2])}.1.{down[3]}"
    up = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", module)
    if up:
        return f"output_blocks.{(per_block + 1) * int(up[1]) + int(up[2])}.1.{up[3]}"
    return module.replace("mid_block.attentions.0.", "middle_block.1.")


def write_kohya(peft_file, target, xl=False, per_block=1):
    """The same LoRA in kohya's layout: lora_unet_ / lora_te_ (lora_te1_ / lora_te2_) prefixes, underscored
    transformers-4 / SGM module names, lora_down / lora_up, and one alpha tensor per module."""
    tensors, metadata = read_lora_file(peft_file)
    config = {}
    for key, value in json.loads(metadata["lora_adapter_metadata"]).items():
        component, _, field = key.partition(".")
        config.setdefault(component, {})[field] = value
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    out = {}
    for key, value in tensors.items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        alpha = config[component]["lora_alpha"]
        alpha = next((v for k, v in config[component]["alpha_pattern"].items() if module.endswith(k)), alpha)
        name = sgm_name(module, per_block) if xl and component == "unet" else module
        name = "text_model." + name if component != "unet" else name
        base = prefixes[component] + name.replace(".", "_")
        out[f"{base}.{'lora_down' if kind == 'A.weight' else 'lora_up'}.weight"] = value
        out[f"{base}.alpha"] = np.array(alpha, dtype=np.float32)
    save_file(out, str(target))
    return target


@pytest.fixture(scope="module")
def lora_sd(tmp_path_factory):
    return make_peft_lora("tiny-sd", tmp_path_factory.mktemp("lora_sd"))


def test_scale_argument():
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora_arg("C:/loras/a.safetensors:-1e-1") == ("C:/loras/a.safetensors", -0.1)
    for bad in ("a.safetensors:nan", "a.safetensors:inf", "a.safetensors:-Infinity"):
        with pytest.raises(LoraError, match="must be a finite number"):
            parse_lora_arg(bad)


class Boom:
    def __reduce__(self):
        return (open, ("/nonexistent-dir/unpickled", "w"))


@pytest.mark.parametrize("name", ["style.ckpt", "style.bin", "style.safetensors"])
def test_pickles_are_refused_unread(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(pickle.dumps(Boom()))  # loading it would raise FileNotFoundError, not LoraError
    with pytest.raises(LoraError, match="pickle"):
        read_lora_file(path)


def test_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(LoraError, match="not a safetensors file"):
        read_lora_file(path)


def test_bad_keys_alphas_and_ranks(tmp_path):
    def check(tensors, match, metadata=None):
        with pytest.raises(LoraError, match=match) as info:
            lora_modules(tensors, metadata or {}, {"unet": {"a.to_q"}}, "x.safetensors")
        assert "\n" not in str(info.value)

    down, up = np.ones((2, 8), np.float32), np.ones((8, 2), np.float32)
    check({"lora_unet_a_to_q.hada_w1_a": down}, r"unknown key format \(lora_unet_a_to_q.hada_w1_a\)")
    check({"unet.a.to_q.weird": down}, "unknown key format")
    check({"lora_unet_a_to_q.lora_down.weight": down, "lora_unet_a_to_q.lora_up.weight": up,
           "lora_unet_a_to_q.alpha": np.array(np.nan, np.float32)}, "alpha .* not a finite number")
    check({"unet.a.to_q.lora_A.weight": np.ones((0, 8), np.float32),
           "unet.a.to_q.lora_B.weight": np.ones((8, 0), np.float32)}, "rank 0")
    check({"unet.a.to_q.lora_A.weight": down}, "no matching up tensor")
    found, _ = lora_modules({"unet.a.to_q.lora_A.weight": down, "unet.a.to_q.lora_B.weight": up}, {},
                            {"unet": {"a.to_q"}})
    with pytest.raises(LoraError, match=r"unet.a.to_q.lora_A.weight .*up \(8, 2\) @ down \(2, 8\).*is \(16, 8\)"):
        found[0].check_fits((16, 8))


def _diffusers_deltas(preset, path, scale):
    """What diffusers' load_lora_weights + fuse_lora adds to every weight of the UNet and text encoders."""
    from linfusion import load_pipeline

    pipe = load_pipeline(preset).pipeline
    names = [n for n in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    before = {n: {k: v.detach().clone() for k, v in getattr(pipe, n).named_parameters()} for n in names}
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    deltas = {}
    for n in names:
        for key, value in getattr(pipe, n).named_parameters():
            if not torch.equal(value, before[n][key]):
                deltas[(n, key)] = (value - before[n][key]).double().numpy()
    return deltas, {n: {k[:-7] for k in before[n] if k.endswith(".weight")} for n in names}


@pytest.fixture(scope="module")
def diffusers_sd(lora_sd):
    return _diffusers_deltas("tiny-sd", lora_sd, 0.6)


def test_peft_conversion_matches_diffusers(lora_sd, diffusers_sd):
    expected, modules = diffusers_sd
    found, unplaced = lora_modules(*read_lora_file(lora_sd), modules)
    ours = {(m.component, m.module + ".weight"): m for m in found}
    assert not unplaced and set(ours) == set(expected) and len(ours) == 79  # 70 UNet modules, 9 text encoder
    for key, delta in expected.items():
        assert np.abs(ours[key].delta(delta.shape, 0.6) - delta).max() <= 1e-6 * np.abs(delta).max(), key


def test_kohya_conversion_matches_diffusers(tmp_path, lora_sd, diffusers_sd):
    """The kohya file gives the updates diffusers fuses from the PEFT file it was written from. diffusers
    itself (0.42 with transformers 5) drops kohya's text-encoder attention keys (self_attn.q/k/v/out_proj:
    its converter names them to_q_lora, which CLIP no longer has); the runtime applies them, as A1111 does,
    and linfusion-export reports them as not placed."""
    path = write_kohya(lora_sd, tmp_path / "kohya.safetensors")
    expected, modules = diffusers_sd
    found, unplaced = lora_modules(*read_lora_file(path), modules)
    ours = {(m.component, m.module + ".weight"): m for m in found}
    assert not unplaced and set(ours) == set(expected)
    for key, delta in expected.items():
        assert np.abs(ours[key].delta(delta.shape, 0.6) - delta).max() <= 1e-6 * np.abs(delta).max(), key
    from_kohya, _ = _diffusers_deltas("tiny-sd", path, 0.6)
    dropped = set(expected) - set(from_kohya)
    assert set(from_kohya) <= set(expected)
    assert all(c == "text_encoder" and re.search(r"self_attn\.(q|k|v|out)_proj", k) for c, k in dropped)
    for key, delta in from_kohya.items():  # what diffusers does place from the kohya file agrees too
        assert np.abs(ours[key].delta(delta.shape, 0.6) - delta).max() <= 1e-6 * np.abs(delta).max(), key


@pytest.mark.slow
def test_sdxl_kohya_conversion_matches_diffusers(tmp_path):
    """SD-XL: kohya's SGM block names and lora_te1_ / lora_te2_, against diffusers' fusion of the PEFT file."""
    peft_file = make_peft_lora("tiny-sdxl", tmp_path, seed=3)
    path = write_kohya(peft_file, tmp_path / "kohya_xl.safetensors", xl=True)
    assert any(k.startswith("lora_unet_input_blocks_") for k in read_lora_file(path)[0])
    expected, modules = _diffusers_deltas("tiny-sdxl", peft_file, 1.0)
    found, unplaced = lora_modules(*read_lora_file(path), modules)
    ours = {(m.component, m.module + ".weight"): m for m in found}
    assert not unplaced and set(ours) == set(expected)
    assert {c for c, _ in ours} == {"unet", "text_encoder", "text_encoder_2"}
    for key, delta in expected.items():
        assert np.abs(ours[key].delta(delta.shape, 1.0) - delta).max() <= 1e-6 * np.abs(delta).max(), key
    # diffusers 0.42 cannot load kohya SD-XL text-encoder keys with transformers 5 (IndexError in
    # get_peft_kwargs: its converter doubles text_model.): compare its SGM mapping on the UNet keys alone.
    tensors = {k: v for k, v in read_lora_file(path)[0].items() if k.startswith("lora_unet_")}
    save_file(tensors, str(tmp_path / "unet_only.safetensors"))
    from_kohya, _ = _diffusers_deltas("tiny-sdxl", tmp_path / "unet_only.safetensors", 1.0)
    assert set(from_kohya) == {k for k in expected if k[0] == "unet"}


@pytest.mark.parametrize("external", [False, True])
def test_patched_model_runs_with_new_weights(tmp_path, external):
    """The in-memory rewrite the runtime builds sessions from, for weights in model.onnx and in
    model.onnx_data; numpy computes the expected output, and the file on disk stays as it was."""
    import onnx
    import onnxruntime as ort
    from linfusion.runtime.lora_onnx import patched_model, read_initializers
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 4)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Cast", ["w2"], ["w2f"], to=1),
             helper.make_node("MatMul", ["x", "w2f"], ["b"]), helper.make_node("Add", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path),
              save_as_external_data=external, location="model.onnx_data", size_threshold=0)
    assert (tmp_path / "model.onnx_data").exists() == external
    new1, new2 = w1 + 1.0, (w2 * 3).astype(np.float16)
    model, files = patched_model(path, {"w1": new1, "w2": new2})
    options = ort.SessionOptions()
    if files:
        options.add_external_initializers_from_files_in_memory(list(files), list(files.values()),
                                                               [a.size for a in files.values()])
    x = rng.standard_normal((2, 8)).astype(np.float32)
    y = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ new1 + x @ new2.astype(np.float32), rtol=1e-5, atol=1e-5)
    on_disk = read_initializers(path, ["w1", "w2"])
    assert np.array_equal(on_disk["w1"], w1) and np.array_equal(on_disk["w2"], w2) and on_disk["w2"].dtype == np.float16
