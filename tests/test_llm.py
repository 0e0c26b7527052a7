"""The notebook API end to end on real Hugging Face checkpoints written by transformers."""

import numpy as np
import pytest
import torch

import hf_models
import jaxllm
from jaxllm.tokenizer import byte_level_tokenizer


@pytest.fixture(scope="module", params=["llama3_gqa", "qwen2_bias"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = hf_models.write(request.param, path)
    byte_level_tokenizer().save(path)
    return path, model


@pytest.fixture(scope="module")
def llm(model_dir):
    # Eight sequences at most: 12 step shapes to compile rather than the default's 21.
    return jaxllm.LLM.load(
        model_dir[0], mesh={"tensor": 2, "data": 4}, max_seq_len=128, max_num_seqs=8
    )


def test_greedy_generation_is_token_identical_to_transformers(model_dir, llm):
    _, model = model_dir
    for prompt in ["def fibonacci(n):", "The quick brown fox", "x" * 40]:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=0
            )[0, len(ids) :].tolist()
        got = llm.generate(prompt, max_tokens=32, temperature=0)
        assert got.token_ids == ref
        assert got.finish_reason == ("stop" if ref[-1] == 257 else "length")
        assert got.prompt_token_ids == ids


def test_logits_match_transformers(model_dir, llm):
    _, model = model_dir
    ids = np.random.default_rng(3).integers(0, 320, size=50).tolist()
    expected = hf_models.torch_logits(model, [ids]).numpy()[0]
    got = llm.logits(ids)
    assert got.shape == (50, 320) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-4


def test_stream_pieces_concatenate_to_the_generated_text(llm):
    pieces = list(llm.stream("Hello", max_tokens=24, temperature=0.9, seed=7))
    full = llm.generate("Hello", max_tokens=24, temperature=0.9, seed=7)
    assert "".join(pieces) == full.text
    assert all(pieces)


def test_seeded_sampling_is_reproducible_and_seed_dependent(llm):
    a = llm.generate("abc", max_tokens=16, temperature=1.0, seed=1, ignore_eos=True)
    b = llm.generate("abc", max_tokens=16, temperature=1.0, seed=1, ignore_eos=True)
    c = llm.generate("abc", max_tokens=16, temperature=1.0, seed=2, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert len(a.token_ids) == 16 and a.finish_reason == "length"


def test_stop_strings_end_generation_and_are_not_shown(llm):
    kwargs = dict(max_tokens=40, temperature=1.0, seed=0, ignore_eos=True)
    text = llm.generate("stop test", **kwargs).text
    # A stop string taken from what this seed makes the model write anyway.
    stop = next(c for c in text[1:] if c.isascii() and c.isprintable())
    got = llm.generate("stop test", stop=[stop], **kwargs)
    assert got.finish_reason == "stop"
    assert got.text == text[: text.index(stop)]


def test_a_list_of_prompts_gives_a_list_of_completions(llm):
    outs = llm.generate(["a", [256, 98, 99]], max_tokens=4, temperature=0, ignore_eos=True)
    assert [len(o.token_ids) for o in outs] == [4, 4]
    assert outs[1].prompt_token_ids == [256, 98, 99]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="x" * 200), "201 tokens, more than the maximum of 127"),
        (dict(prompt="x" * 100, max_tokens=50), "lower max_tokens to at most 27"),
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt=[5, 999]), r"token ids must be in \[0, 320\)"),
        (dict(prompt="a", temperature=-1), "temperature"),
        (dict(prompt="a", top_p=0), "top_p"),
    ],
)
def test_bad_requests_get_clear_errors(llm, kwargs, message):
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt")
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, **kwargs)
    assert llm.generate("still works", max_tokens=2, temperature=0).token_ids
