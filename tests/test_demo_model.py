"""The demo model: the train step learns on a sharded mesh, and the bundled model that
``LLM.load()`` serves is a real (small) language model of Python code."""

import ast
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm import cli, demo, orbax_checkpoint
from jaxllm.config import ModelConfig
from jaxllm.params import ModelSpec
from jaxllm.train import OptimizerConfig, Trainer
from sharding import DATA_PARALLEL, FSDP_TENSOR, make_mesh

# Written by scripts/train_demo.py from files it held out of training.
HELDOUT_SAMPLE = Path(__file__).parent / "data" / "demo_heldout_sample.json"

TINY = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=32,
)
V, T = TINY.vocab_size, 16


def counting(starts: np.ndarray) -> np.ndarray:
    """``[B, T + 1]`` windows that count upward mod V: learnable, and held-out rows (other
    starts) are only predicted well if the rule is learned, not the rows memorised."""
    return (starts[:, None] + np.arange(T + 1)) % V


def trainer_on(mesh_shape: dict[str, int], rules) -> Trainer:
    # Heads the tensor axis does not divide stay replicated: copies would not train as one.
    spec = ModelSpec(TINY, jnp.float32, make_mesh(mesh_shape), rules, split_heads=False)
    graphdef, state = spec.random_state(0)
    opt = OptimizerConfig(total_steps=30, warmup_steps=3, peak_lr=1e-2).optimizer()
    return Trainer(spec, graphdef, state, opt)


def test_train_steps_reduce_loss_on_8_devices():
    trainer = trainer_on({"data": 8}, DATA_PARALLEL)
    rng = np.random.default_rng(0)
    heldout = counting(rng.integers(0, V, 16))
    before = trainer.eval_loss(heldout)
    first_params = trainer.state.params
    losses = [float(trainer.train_step(counting(rng.integers(0, V, 16)))[0]) for _ in range(30)]
    after = trainer.eval_loss(heldout)
    assert before > 0.9 * np.log(V)  # a random model starts near chance
    assert after < 0.5 * before, (before, after)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    # The state is donated: the step updated the parameters in place of the old arrays.
    assert all(p.is_deleted() for p in first_params)
    # Parameters keep the layout the rules give them (replicated under data parallelism).
    for p in trainer.state.params:
        assert p.sharding.is_fully_replicated and len(p.sharding.device_set) == 8


def test_sharded_training_matches_data_parallel():
    """The same steps under the serving default (FSDP x tensor) give the same losses."""
    batches = [counting(np.random.default_rng(i).integers(0, V, 8)) for i in range(4)]
    runs = []
    for mesh_shape, rules in [
        ({"data": 8}, DATA_PARALLEL),
        ({"fsdp": 2, "tensor": 4}, FSDP_TENSOR),
    ]:
        trainer = trainer_on(mesh_shape, rules)
        runs.append([float(trainer.train_step(b)[0]) for b in batches])
        embed = trainer.model_state()["embed"].get_value()
        assert embed.sharding.spec == rules.spec(("vocab", "embed"), embed.shape, trainer.spec.mesh)
    np.testing.assert_allclose(runs[0], runs[1], rtol=2e-4)


@pytest.fixture(scope="module")
def llm():
    with jaxllm.LLM.load(warm_up=False, max_num_seqs=2) as llm:
        yield llm


def test_load_without_a_path_serves_the_trained_demo_model(llm):
    assert llm.name == demo.DEMO_MODEL_NAME
    assert demo.DEMO_MODEL_DIR.parent == Path(jaxllm.__file__).resolve().parent
    assert llm.config == orbax_checkpoint.read_config(demo.DEMO_MODEL_DIR)
    record = demo.training_record()
    assert record["steps"] > 0 and record["parameters"] == llm.config.num_params
    assert llm.config.vocab_size == llm.tokenizer.vocab_size == len(record["train_unigram_counts"])
    # The trained BPE tokenizer, not bytes: common Python words are single tokens.
    assert len(llm.tokenizer.encode(" return", add_special_tokens=False)) == 1
    checkpoint_bytes = sum(p.stat().st_size for p in demo.DEMO_MODEL_DIR.rglob("*") if p.is_file())
    assert checkpoint_bytes < 30e6


def test_heldout_perplexity_is_under_half_the_unigram_perplexity(llm):
    counts = np.asarray(demo.training_record()["train_unigram_counts"], np.float64)
    unigram_logp = np.log((counts + 1) / (counts.sum() + len(counts)))  # add-one smoothed
    files = json.loads(HELDOUT_SAMPLE.read_text())["files"]
    model_nll, unigram_nll, n = 0.0, 0.0, 0
    for file in files:
        ids = llm.tokenizer.encode(file["text"])
        # Windows of the model's context overlapping by one token: every token but the
        # first BOS is predicted exactly once.
        for start in range(0, len(ids) - 1, llm.max_seq_len - 1):
            window = ids[start : start + llm.max_seq_len]
            logp = jax.nn.log_softmax(llm.logits(window)[:-1], axis=-1)
            targets = np.asarray(window[1:])
            model_nll -= float(np.take_along_axis(np.asarray(logp), targets[:, None], 1).sum())
            unigram_nll -= float(unigram_logp[targets].sum())
            n += len(targets)
    model_ppl, unigram_ppl = np.exp(model_nll / n), np.exp(unigram_nll / n)
    print(f"{n} held-out tokens: model ppl {model_ppl:.1f}, unigram ppl {unigram_ppl:.1f}")
    assert n >= 2000
    assert model_ppl <= 0.5 * unigram_ppl


def longest_parsing_prefix(source: str) -> int:
    """Number of whole lines at the start of ``source`` that parse as Python, with a
    ``pass`` body supplied if they end in a block opener (a completion cut mid-block)."""
    lines = source.split("\n")[:-1]  # the last line may be cut mid-token
    for n in range(len(lines), 0, -1):
        head = "\n".join(lines[:n])
        for candidate in (head, head + "\n" + " " * (_indent(lines[n - 1]) + 4) + "pass"):
            try:
                ast.parse(candidate)
                return n
            except SyntaxError:
                pass
    return 0


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


# Not "import ": a prompt ending in a space splits a token the byte-level BPE always merges
# with the next word (" os"), and this small model answers it with comment lines.
@pytest.mark.parametrize("prompt", ["def fibonacci(n):", "class Stack:"])
def test_greedy_completions_look_like_python(llm, prompt):
    completion = llm.generate(prompt, max_tokens=48, temperature=0).text
    source = prompt + completion
    print(repr(source))
    # At least three whole lines parse (the prompt's and two the model wrote).
    assert longest_parsing_prefix(source) >= 3, source
    if prompt.startswith("def"):
        assert completion.startswith("\n    "), completion  # an indented body follows


def test_cli_generate_without_model_uses_the_demo_model(capsys):
    assert cli.main(["generate", "--max-tokens", "8", "def fibonacci(n):"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def fibonacci(n):") and len(out) > len("def fibonacci(n):\n")
    assert demo.DEMO_MODEL_NAME in err


def test_training_refuses_heads_copied_over_the_tensor_axis():
    # TINY's 2 KV heads over tensor=4: serving copies them, training must not.
    spec = ModelSpec(TINY, jnp.float32, make_mesh({"fsdp": 2, "tensor": 4}), FSDP_TENSOR)
    assert spec.config.head_layout is not None
    opt = OptimizerConfig(total_steps=4, warmup_steps=1, peak_lr=1e-2).optimizer()
    with pytest.raises(ValueError, match="split_heads=False"):
        Trainer(spec, *spec.random_state(0), opt)
