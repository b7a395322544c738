import warnings

import numpy as np
import pytest

from clip_reference import ClipReference
from linfusion import load_pipeline
from linfusion.runtime.text import ClipTokenizer

PROMPTS = ["a photo of an astronaut riding a horse on mars", "", "UPPER case, punctuation!!! and 123 numbers",
           "naïve café ünïcödé 東京 🚀", "  many    spaces\tand\nnewlines  ", "it's a dog's life, isn't it?"]


@pytest.mark.parametrize("preset,name", [("tiny-sd", "tokenizer"), ("tiny-sdxl", "tokenizer"),
                                         ("tiny-sdxl", "tokenizer_2")])
def test_ids_equal_transformers_clip_tokenizer(exported, preset, name, tmp_path):
    """Against transformers' CLIPTokenizer on the hub-format files (vocab.json, merges.txt and
    configs, as the base model repos ship them), the pipeline's own tokenizer, and CLIP's
    algorithm. transformers treats a pad token "!" as a special token, so every "!" in a prompt
    becomes id 0 instead of going through BPE; diffusers' SD-XL does that, so the runtime does."""
    import shutil

    from transformers import CLIPTokenizer

    ours = ClipTokenizer(exported(preset) / name)
    for file in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(exported(preset) / name / file, tmp_path / file)
    theirs = CLIPTokenizer.from_pretrained(str(tmp_path))
    original = getattr(load_pipeline(preset).pipeline, name)
    reference = ClipReference(exported(preset) / name)
    ids = ours(PROMPTS)
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), 77)
    for row, prompt in zip(ids, PROMPTS):
        expected = theirs(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert row.tolist() == expected, prompt
        assert row.tolist() == original(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        if not (name == "tokenizer_2" and "!" in prompt):
            assert row.tolist() == reference.encode(prompt, theirs.pad_token_id), prompt
    pad = ids[1, 2:]
    assert (pad == (0 if name == "tokenizer_2" else theirs.eos_token_id)).all()


def test_long_prompts_are_truncated_with_a_warning(exported):
    ours = ClipTokenizer(exported("tiny-sd") / "tokenizer")
    theirs = load_pipeline("tiny-sd").pipeline.tokenizer
    prompt = "a very long prompt about " + "mountains and rivers " * 60
    with pytest.warns(UserWarning, match="truncated to 77 tokens"):
        ids = ours([prompt])[0]
    assert ids.tolist() == theirs(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids[-1] == theirs.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(["short prompt"])
