import pytest
import torch

from linfusion import ModelSourceError, load_pipeline
from linfusion.attention import GeneralizedLinearAttention
from linfusion.loader import official_checkpoint_for
from test_checkpoint import run_unet, unet_inputs


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelSourceError, match="unknown model 'sd16'.*preset"):
        load_pipeline("sd16")


def test_offline_hub_id_suggests_random_weights_or_a_local_path():
    with pytest.raises(ModelSourceError, match="local folder") as info:
        load_pipeline("someone/not-cached-model", local_files_only=True)
    assert "--" not in str(info.value) and "--random-weights" in info.value.cli_hint
    with pytest.raises(ModelSourceError, match="random_weights=True") as info:
        load_pipeline("sdxl", local_files_only=True)
    assert "--" not in str(info.value) and "--random-weights" in info.value.cli_hint


def test_random_weights_need_a_preset():
    with pytest.raises(ModelSourceError, match="needs a preset"):
        load_pipeline("someone/model", random_weights=True)


def test_missing_local_folder():
    with pytest.raises(ModelSourceError, match="no such folder"):
        load_pipeline("./does/not/exist")


def test_local_diffusers_folder_with_linfusion_folder(tmp_path, tiny_sd):
    """A pipeline saved in diffusers' layout (safetensors) loads back with its LinFusion."""
    base = load_pipeline("tiny-sd", seed=11)
    pipe = base.pipeline
    from linfusion.presets import build_random_pipeline, get_preset
    vanilla = build_random_pipeline(get_preset("tiny-sd"), seed=11)  # same weights, softmax attn1
    vanilla.save_pretrained(tmp_path / "my-model", safe_serialization=True)
    base.linfusion.save_pretrained(tmp_path / "my-linfusion")

    loaded = load_pipeline(str(tmp_path / "my-model"), linfusion=str(tmp_path / "my-linfusion"))
    assert loaded.base_model == str((tmp_path / "my-model").resolve())
    assert loaded.linfusion_source == str((tmp_path / "my-linfusion").resolve())
    assert not loaded.random_weights
    assert torch.equal(run_unet(loaded.pipeline, unet_inputs(pipe)), run_unet(pipe, unet_inputs(pipe)))


def test_local_folder_without_linfusion_needs_a_known_name(tmp_path):
    from linfusion.presets import build_random_pipeline, get_preset
    build_random_pipeline(get_preset("tiny-sd")).save_pretrained(tmp_path / "my-finetune")
    with pytest.raises(ModelSourceError, match="linfusion=") as info:
        load_pipeline(str(tmp_path / "my-finetune"))
    assert "--linfusion" in info.value.cli_hint
    named = tmp_path / "stable-diffusion-xl-base-1.0"
    named.mkdir()
    assert official_checkpoint_for(str(named)) == "Yuanshi/LinFusion-XL"
    assert official_checkpoint_for("runwayml/stable-diffusion-v1-5") == "Yuanshi/LinFusion-1-5"


def test_fp16_loading_casts_unet_and_linfusion(tiny_sd):
    loaded = load_pipeline("tiny-sd", dtype=torch.float16)
    layers = [m for m in loaded.pipeline.unet.modules() if isinstance(m, GeneralizedLinearAttention)]
    assert layers and all(m.to_q.weight.dtype == torch.float16 for m in layers)
    assert loaded.pipeline.unet.conv_in.weight.dtype == torch.float16
