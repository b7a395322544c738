import pytest
import torch

from clip_reference import ClipReference
from linfusion import PRESETS, load_pipeline
from linfusion.attention import GeneralizedLinearAttention
from linfusion.presets import build_random_pipeline, get_preset, load_tokenizer
from linfusion.mount import self_attention_modules
from test_checkpoint import run_unet, unet_inputs

PROMPTS = ["a photo of an astronaut riding a horse", "Zebra-striped QUANTUM teapot!!, 16k uhd",
           "", "word " * 100, "naïve café ünïcödé 東京"]


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
def test_tiny_preset_runs_a_unet_forward_with_attention_at_several_resolutions(preset):
    loaded = load_pipeline(preset)
    unet = loaded.pipeline.unet
    tokens_seen = set()
    hooks = [m.register_forward_hook(lambda m, args, out: tokens_seen.add(args[0].shape[1]))
             for m in unet.modules() if isinstance(m, GeneralizedLinearAttention)]
    out = run_unet(loaded.pipeline, unet_inputs(loaded.pipeline, batch=2, size=16))
    for h in hooks:
        h.remove()
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    assert len(tokens_seen) >= 2, tokens_seen
    assert all(isinstance(m, GeneralizedLinearAttention) for m in self_attention_modules(unet).values())
    assert len(self_attention_modules(unet)) == len(loaded.linfusion.modules_list)


def test_tiny_sdxl_has_the_sdxl_code_paths(tiny_sdxl):
    pipe = tiny_sdxl.pipeline
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.use_linear_projection
    assert max(pipe.unet.config.transformer_layers_per_block) > 1
    assert pipe.text_encoder_2.config.projection_dim > 0
    assert pipe.unet.config.cross_attention_dim == (pipe.text_encoder.config.hidden_size
                                                    + pipe.text_encoder_2.config.hidden_size)
    mids = {e["projection_mid_dim"] for e in tiny_sdxl.linfusion.modules_list}
    assert None not in mids  # XL-style narrow projections


@pytest.mark.parametrize("preset,name,pad_is_eos", [
    ("tiny-sd", "tokenizer", True), ("tiny-sdxl", "tokenizer", True), ("tiny-sdxl", "tokenizer_2", False)])
def test_tiny_tokenizers_follow_clip(preset, name, pad_is_eos, tmp_path):
    tokenizer = load_tokenizer(get_preset(preset), name)
    tokenizer.save_pretrained(tmp_path)
    from linfusion.clip_bpe import corpus_merges, write_clip_tokenizer
    from linfusion.presets import TINY_MERGES
    write_clip_tokenizer(tmp_path / "files", list(corpus_merges(TINY_MERGES)), len(tokenizer), {})
    reference = ClipReference(tmp_path / "files")
    vocab_size = len(tokenizer)
    assert tokenizer.bos_token_id == vocab_size - 2 and tokenizer.eos_token_id == vocab_size - 1
    assert tokenizer.convert_tokens_to_ids("!") == 0
    assert tokenizer.pad_token_id == (tokenizer.eos_token_id if pad_is_eos else 0)
    assert any(t.endswith("</w>") and len(t) > 5 for t in tokenizer.get_vocab())
    for prompt in PROMPTS:
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ids == reference.encode(prompt, tokenizer.pad_token_id), prompt


def test_random_weights_are_seeded_per_component():
    a = build_random_pipeline(get_preset("tiny-sd"), seed=5)
    b = build_random_pipeline(get_preset("tiny-sd"), seed=5)
    c = build_random_pipeline(get_preset("tiny-sd"), seed=6)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def count(module):
    return sum(p.numel() for p in module.parameters())


def linfusion_params(entries):
    """Per layer: W_q, W_k, W_v, W_o (+bias), and two P = Linear, LayerNorm, Linear."""
    total = 0
    for e in entries:
        d, m = e["dim_n"], e["projection_mid_dim"] or e["dim_n"]
        total += 4 * d * d + d + 2 * (d * m + m + 2 * m + m * d + d)
    return total


# Published parameter counts of the base models (diffusers / transformers on the hub).
REAL_COUNTS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480, "attn1": 16},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840, "attn1": 16},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
             "text_encoder_2": 694_659_840, "attn1": 70},
}


@pytest.mark.parametrize("preset", ["sd15", "sd21", "sdxl"])
def test_real_size_presets_have_the_published_sizes(preset):
    """Built on the meta device: the real architectures, without allocating their weights."""
    pipe = build_random_pipeline(get_preset(preset), device="meta")
    with torch.device("meta"):
        expected = REAL_COUNTS[preset]
        for name, n in expected.items():
            if name != "attn1":
                assert count(getattr(pipe, name)) == n, name
        from linfusion import LinFusion
        lf = LinFusion.from_unet(pipe.unet, get_preset(preset).projection_mid_divisor)
        assert len(lf.modules_list) == expected["attn1"]
        assert count(lf) == linfusion_params(lf.modules_list)
        lf.mount(pipe.unet)
    assert all(isinstance(m, GeneralizedLinearAttention) for m in self_attention_modules(pipe.unet).values())
    if preset == "sdxl":
        assert {e["projection_mid_dim"] * 16 for e in lf.modules_list} == {640, 1280}
    assert len(pipe.tokenizer) == 49408


def test_every_preset_is_listed_with_its_source():
    assert set(PRESETS) == {"sd15", "sd21", "sdxl", "tiny-sd", "tiny-sdxl", "tiny-sd-inpaint",
                            "tiny-sdxl-inpaint"}
    assert PRESETS["sdxl"].linfusion_checkpoint == "Yuanshi/LinFusion-XL"
    with pytest.raises(ValueError, match="unknown preset 'sd16'"):
        get_preset("sd16")
