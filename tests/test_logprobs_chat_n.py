"""Logprobs (generated and prompt), n > 1 and chat in the notebook API and the engine, checked
against the dense forward (`llm.logits`) of the same model; and over gRPC through a real
server process."""

from __future__ import annotations

import json
import random
import time

import grpc
import jax
import numpy as np
import pytest
from test_sampling import reference_probs

import hf_models
import jaxllm
from jaxllm.chat import chat_prompt_ids
from jaxllm.engine import CompileCounter
from jaxllm.sampling import SamplingParams
from jaxllm.tokenizer import Tokenizer, byte_level_tokenizer
from serve.client import Client
from server_process import serving
from sharding import make_mesh

# The server's engine options too (its other options keep their defaults), so both run the
# same programs.
OPTIONS = dict(max_seq_len=128, max_num_seqs=4)
PAGE = jaxllm.EngineConfig().page_size
# Llama-3-like: BOS from the template itself, a header per turn.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "def add(a, b):"},
]


def write_chat_model(path):
    hf_models.write("llama3_gqa", path)
    byte_level_tokenizer().save(path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATE
    config_path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_chat_model(tmp_path_factory.mktemp("chat_model"))


@pytest.fixture(scope="module")
def llm(model_dir):
    mesh = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    with jaxllm.LLM.load(model_dir, mesh=mesh, warm_up_prompt_logprobs=True, **OPTIONS) as llm:
        yield llm


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def step_logits(llm, prompt, completion) -> np.ndarray:
    """[N, V]: the logits each generated token was drawn from, by the dense forward."""
    logits = llm.logits(list(prompt) + completion.token_ids[:-1])
    return logits[len(prompt) - 1 :]


def prompt_of(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [256] + [rng.randrange(256) for _ in range(length - 1)]


def assert_top_consistent(lp: jaxllm.TokenLogprob, k: int) -> None:
    """Sorted, at most k, and holding the sampled token's own logprob when it is among them."""
    assert len(lp.top) <= k
    values = [v for _, v in lp.top]
    assert values == sorted(values, reverse=True)
    ids = [t for t, _ in lp.top]
    if lp.token_id in ids:
        assert lp.top[ids.index(lp.token_id)][1] == pytest.approx(lp.logprob, abs=1e-6)
    elif len(lp.top) == k:
        assert lp.logprob <= values[-1] + 1e-6


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_logprobs_equal_log_softmax_of_the_logits(llm, temperature):
    """At temperature 1 (no filters) and for greedy requests: the model's own distribution."""
    prompt = prompt_of(1, 21)
    out = llm.generate(
        prompt, max_tokens=12, temperature=temperature, seed=5, logprobs=5, ignore_eos=True
    )
    assert len(out.logprobs) == len(out.token_ids) == 12
    ref = log_softmax(step_logits(llm, prompt, out))
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(ref[i, token], abs=1e-4)
        order = np.argsort(-ref[i], kind="stable")[:5]
        assert [t for t, _ in lp.top] == order.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], ref[i, order], atol=1e-4)
        assert_top_consistent(lp, 5)
    if temperature == 0:
        assert all(lp.top[0][0] == lp.token_id for lp in out.logprobs)
    assert out.prompt_logprobs is None


def kept_logprobs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """log of the distribution one row [V] is drawn from (tests/test_sampling.py's reference:
    HF's warpers in float64)."""
    with np.errstate(divide="ignore"):
        return np.log(reference_probs(logits, p))


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.6),
        dict(temperature=1.3, top_k=4),
        dict(temperature=0.9, top_p=0.3),
        dict(temperature=1.0, min_p=0.5),
        dict(temperature=0.8, top_k=50, top_p=0.6, min_p=0.1),
    ],
    ids=["temperature", "top_k", "top_p", "min_p", "all"],
)
def test_logprobs_are_those_of_the_distribution_sampled_from(llm, params):
    p = SamplingParams(max_tokens=10, seed=11, logprobs=8, ignore_eos=True, **params)
    prompt = prompt_of(2, 13)
    out = llm.generate(prompt, max_tokens=10, seed=11, logprobs=8, ignore_eos=True, **params)
    ref = np.stack([kept_logprobs(row, p) for row in step_logits(llm, prompt, out)])
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        # The filters were honoured on the device: the token is inside the kept set.
        assert np.isfinite(ref[i, token]), (i, token)
        assert lp.logprob == pytest.approx(ref[i, token], abs=1e-4)
        kept = np.flatnonzero(np.isfinite(ref[i]))
        order = kept[np.argsort(-ref[i, kept], kind="stable")][:8]
        assert [t for t, _ in lp.top] == order.tolist()  # filtered tokens are left out
        np.testing.assert_allclose([v for _, v in lp.top], ref[i, order], atol=1e-4)
        assert_top_consistent(lp, 8)
    if p.top_k == 4:
        assert all(len(lp.top) == 4 for lp in out.logprobs)


def test_min_p_is_honoured_on_the_device(llm):
    """Many draws at a high temperature with min_p: never a token below min_p * p_max."""
    prompt = prompt_of(3, 9)
    outs = llm.generate(
        [prompt] * 6, max_tokens=16, temperature=2.0, min_p=0.3, logprobs=0, ignore_eos=True
    )
    plain = llm.generate(prompt, max_tokens=16, temperature=2.0, seed=1, ignore_eos=True)
    for out in outs:
        probs = np.exp(log_softmax(step_logits(llm, prompt, out) / 2.0))
        chosen = probs[np.arange(len(out.token_ids)), out.token_ids]
        assert (chosen >= 0.3 * probs.max(axis=-1) - 1e-6).all()
        assert all(lp.top == () for lp in out.logprobs)  # logprobs=0: the token's own only
    # Without min_p the same temperature does draw such tokens (the check above can fail).
    probs = np.exp(log_softmax(step_logits(llm, prompt, plain) / 2.0))
    chosen = probs[np.arange(16), plain.token_ids]
    assert (chosen < 0.3 * probs.max(axis=-1)).any()


def test_prompt_logprobs_match_the_dense_forward(llm):
    prompt = prompt_of(4, 40)
    out = llm.generate(prompt, max_tokens=3, temperature=0, prompt_logprobs=4, logprobs=1)
    ref = log_softmax(llm.logits(prompt))
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for t in range(1, len(prompt)):
        lp = out.prompt_logprobs[t]
        assert lp.token_id == prompt[t]
        assert lp.logprob == pytest.approx(ref[t - 1, prompt[t]], abs=1e-4)
        order = np.argsort(-ref[t - 1], kind="stable")[:4]
        assert [i for i, _ in lp.top] == order.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], ref[t - 1, order], atol=1e-4)
    # Scoring does not change the completion.
    assert out.token_ids == llm.generate(prompt, max_tokens=3, temperature=0).token_ids


def test_n_choices_are_seeded_reproducible_and_differ(llm):
    prompt = prompt_of(5, 19)
    kw = dict(max_tokens=10, temperature=1.0, seed=40, ignore_eos=True, logprobs=2)
    first = llm.generate(prompt, n=3, **kw)
    assert len(first) == 3 and all(isinstance(c, jaxllm.Completion) for c in first)
    # Reproducible with other work in flight.
    noise = llm.engine.submit(prompt_of(6, 30), SamplingParams(max_tokens=40, ignore_eos=True))
    again = llm.generate(prompt, n=3, **kw)
    noise.wait(60)
    assert [c.token_ids for c in again] == [c.token_ids for c in first]
    assert len({tuple(c.token_ids) for c in first}) == 3
    # Choice i is the request seeded seed + i.
    for i, choice in enumerate(first):
        alone = llm.generate(prompt, **{**kw, "seed": 40 + i})
        assert alone.token_ids == choice.token_ids
        assert [lp.logprob for lp in alone.logprobs] == pytest.approx(
            [lp.logprob for lp in choice.logprobs], abs=1e-5
        )
    # A list of prompts gives a list of n-lists.
    both = llm.generate([prompt, prompt_of(7, 5)], n=2, max_tokens=3)
    assert [len(group) for group in both] == [2, 2]
    with pytest.raises(ValueError, match="n must be"):
        llm.generate(prompt, n=0)


def test_n_choices_share_the_prompt_pages(llm):
    engine = llm.engine
    prompt = prompt_of(8, 45)  # full pages before the one holding the last token: shared
    shared = (len(prompt) - 1) // PAGE * PAGE
    before = engine.stats()
    out = llm.generate(prompt, n=4, max_tokens=4, temperature=1.0, seed=3, prompt_logprobs=1)
    after = engine.stats()
    assert after["prefix_hit_tokens"] - before["prefix_hit_tokens"] == 3 * shared
    assert after["prompt_tokens"] - before["prompt_tokens"] == 4 * len(prompt)
    # The prompt was scored once and every choice got the scores.
    assert all(c.prompt_logprobs == out[0].prompt_logprobs for c in out)
    assert len(out[0].prompt_logprobs) == len(prompt)


def test_cancelling_one_choice_leaves_the_others(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=9, ignore_eos=True)
    requests = engine.submit_many(prompt_of(9, 30), params, 3, request_id="job")
    assert [r.id for r in requests] == ["job-0", "job-1", "job-2"]
    deadline = time.monotonic() + 30
    while not requests[1].output.token_ids and time.monotonic() < deadline:
        time.sleep(0.005)
    requests[1].cancel()
    outs = [r.wait(60) for r in requests]
    assert [o.finish_reason for o in outs] == ["length", "cancelled", "length"]
    assert len(outs[1].token_ids) < 60
    # Cancelling the first choice before it has computed the prompt frees the others too.
    requests = engine.submit_many(prompt_of(10, 60), params, 3)
    requests[0].cancel()
    assert [r.wait(60).finish_reason for r in requests] == ["cancelled", "length", "length"]
    engine.wait_idle()
    assert engine.stats()["pages_used"] == 0


def test_chat_equals_generate_on_the_rendered_prompt(llm):
    ids = chat_prompt_ids(llm.tokenizer, MESSAGES)
    text = llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert ids == llm.tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == llm.tokenizer.bos_id and ids[1] != llm.tokenizer.bos_id  # BOS once
    assert text.endswith("<|assistant|>")
    reply = llm.chat(MESSAGES, max_tokens=8, temperature=0, ignore_eos=True)
    assert reply.prompt_token_ids == ids
    assert (
        reply.token_ids == llm.generate(ids, max_tokens=8, temperature=0, ignore_eos=True).token_ids
    )
    several = llm.chat([MESSAGES, MESSAGES[1:]], max_tokens=4, temperature=0, n=2)
    assert [len(group) for group in several] == [2, 2]
    assert several[0][0].token_ids == reply.token_ids[:4]


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "must not be empty"),
        ("hello", "must be a list"),
        ([{"role": "robot", "content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": None}], r"messages\[0\]\.content must be a string"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\]"),
        ([{"role": "user", "content": "a", "tool_calls": []}], "unsupported keys"),
    ],
)
def test_bad_messages_are_refused_clearly(llm, messages, message):
    with pytest.raises(ValueError, match=message):
        chat_prompt_ids(llm.tokenizer, messages)
    with pytest.raises(ValueError, match=message):
        llm.chat(messages)
    with pytest.raises(ValueError, match=message):
        llm.chat([MESSAGES, messages])  # one bad conversation of several


def test_chat_without_a_template_is_refused():
    with pytest.raises(ValueError, match="this model has no chat template"):
        chat_prompt_ids(byte_level_tokenizer(), MESSAGES)


def test_chat_template_errors_become_value_errors(tmp_path):
    tokenizer = byte_level_tokenizer()
    tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('roles must alternate') }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="roles must alternate"):
        chat_prompt_ids(Tokenizer.from_dir(tmp_path), MESSAGES)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, 21, True])
def test_bad_logprob_counts_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_logprob_requests_compile_nothing_after_warm_up(llm):
    before = CompileCounter.count
    rng = random.Random(0)
    jobs = []
    for i in range(12):
        prompt = prompt_of(100 + i, rng.randrange(2, 120))
        params = SamplingParams(
            max_tokens=rng.randrange(1, 128 - len(prompt) + 1) if i % 4 == 0 else 5,
            temperature=rng.choice([0, 0.7, 1.0]),
            top_k=rng.choice([0, 3]),
            logprobs=rng.choice([None, 0, 20]),
            prompt_logprobs=rng.choice([None, 0, 20]),
        )
        jobs.append(llm.engine.submit_many(prompt, params, rng.choice([1, 2])))
    for group in jobs:
        for request in group:
            request.wait(120)
    assert CompileCounter.count == before, f"{CompileCounter.count - before} compiles"


# -- gRPC ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    args = ["--model", str(model_dir), "--max-num-seqs", "4", "--max-seq-len", "128"]
    with serving(args, tmp_path_factory.mktemp("serve_log") / "server.log") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target) as c:
        yield c


def test_grpc_logprobs_match_the_notebook_api(llm, client):
    prompt = prompt_of(20, 17)
    kw = dict(max_tokens=8, temperature=0.8, top_k=20, seed=2, ignore_eos=True)
    got = client.generate(prompt, logprobs=True, num_logprobs=3, prompt_logprobs=True, **kw)
    want = llm.generate(prompt, logprobs=3, prompt_logprobs=0, **kw)
    assert got.token_ids == want.token_ids
    assert [lp.token_id for lp in got.logprobs] == got.token_ids
    for g, w in zip(got.logprobs, want.logprobs, strict=True):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
        assert [t for t, _ in g.top] == [t for t, _ in w.top]
    # Prompt logprobs from the second prompt token on, no alternatives (0 asked).
    assert [lp.token_id for lp in got.prompt_logprobs] == prompt[1:]
    assert [lp.logprob for lp in got.prompt_logprobs] == pytest.approx(
        [lp.logprob for lp in want.prompt_logprobs[1:]], abs=1e-4
    )
    assert all(lp.top == () for lp in got.prompt_logprobs)
    # num_logprobs > 0 implies logprobs; none asked, none sent.
    assert len(client.generate(prompt, num_logprobs=1, **kw).logprobs) == 8
    assert client.generate(prompt, **kw).logprobs == []


def test_grpc_n_is_seeded_per_choice(llm, client):
    prompt = prompt_of(21, 9)
    kw = dict(max_tokens=6, temperature=1.0, seed=77, ignore_eos=True)
    results = client.generate(prompt, n=3, request_id="many", **kw)
    assert [r.index for r in results] == [0, 1, 2]
    want = llm.generate(prompt, n=3, **kw)
    assert [r.token_ids for r in results] == [c.token_ids for c in want]
    assert all(r.finish_reason == "length" and r.completion_tokens == 6 for r in results)
    with pytest.raises(grpc.RpcError) as e:
        client.generate(prompt, n=17, **kw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n:" in e.value.details()


def test_grpc_chat(llm, client):
    kw = dict(max_tokens=6, temperature=0, ignore_eos=True)
    got = client.chat(MESSAGES, **kw)
    want = llm.chat(MESSAGES, **kw)
    assert got.token_ids == want.token_ids and got.text == want.text
    assert got.prompt_tokens == len(want.prompt_token_ids)
    for messages, detail in [
        ([{"role": "robot", "content": "x"}], "messages: messages[0].role"),
        ([], "empty"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            client.chat(messages, **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert detail in e.value.details()
