"""Structured pruning of MLP channels and attention heads: the importance measures against
an independent reference (transformers), exactly the lowest-scored channels and heads
removed, pruned checkpoints that load on an 8-device mesh and generate, the ``jaxllm prune``
command, and a real quality check on the demo model."""

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import hf_models
import jaxllm
from jaxllm import cli, demo, prune
from jaxllm import orbax_checkpoint as oc
from jaxllm.params import ModelSpec, named_params
from jaxllm.tokenizer import byte_level_tokenizer
from sharding import DEFAULT_RULES, make_mesh

HELDOUT_SAMPLE = Path(__file__).parent / "data" / "demo_heldout_sample.json"
MESH = {"data": 2, "tensor": 4}
F = 96  # the tiny model's MLP width (hf_models._BASE)
ONE_DEVICE = make_mesh({"tensor": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama written by transformers (the reference), and its jaxllm conversion."""
    hf_dir = tmp_path_factory.mktemp("hf")
    torch_model = hf_models.write("llama3_gqa", hf_dir)
    byte_level_tokenizer().save(hf_dir)
    ckpt = oc.convert_hf_to_orbax(hf_dir, tmp_path_factory.mktemp("orbax") / "ckpt")
    return torch_model, hf_dir, ckpt


@pytest.fixture(scope="module")
def llm(tiny):
    with jaxllm.LLM.load(tiny[2], mesh=MESH, warm_up=False, max_num_seqs=2) as llm:
        yield llm


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    # Real text for the byte-level tokenizer: this project's own source.
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(Path(prune.__file__).read_text())
    return path


def windows(seed: int, n: int = 3, length: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 320, (n, length), dtype=np.int32)


def test_importance_matches_a_transformers_reference_and_the_lowest_channels_go(tiny, llm):
    torch_model = tiny[0]
    calib = windows(0)
    acts = []  # per layer: what down_proj reads, silu(gate) * up, [B, T, F]
    heads = []  # per layer: what o_proj reads, the heads' outputs, [B, T, N * H]
    hooks = [
        layer.mlp.down_proj.register_forward_hook(lambda m, args, out: acts.append(args[0]))
        for layer in torch_model.model.layers
    ] + [
        layer.self_attn.o_proj.register_forward_hook(lambda m, args, out: heads.append(args[0]))
        for layer in torch_model.model.layers
    ]
    try:
        hf_models.torch_logits(torch_model, calib)
    finally:
        for h in hooks:
            h.remove()
    expected = np.stack(
        [
            a.abs().mean(dim=(0, 1)).double().numpy()
            * torch.linalg.vector_norm(layer.mlp.down_proj.weight.detach(), dim=0).double().numpy()
            for a, layer in zip(acts, torch_model.model.layers, strict=True)
        ]
    )
    scores = prune.importance(llm, calib, batch=2)  # a padded last batch too
    got = scores.mlp
    assert got.shape == (2, F)
    np.testing.assert_allclose(got, expected, rtol=2e-4)
    # Heads: mean over tokens of the norm of each head's share of o_proj's output.
    expected_heads = []
    for o, layer in zip(heads, torch_model.model.layers, strict=True):
        B, T, _ = o.shape
        w = layer.self_attn.o_proj.weight.detach().reshape(-1, 4, 16)  # [D, N, H]
        share = torch.einsum("btnh,dnh->btnd", o.reshape(B, T, 4, 16), w)
        expected_heads.append(share.norm(dim=-1).mean(dim=(0, 1)).double().numpy())
    np.testing.assert_allclose(scores.heads, np.stack(expected_heads), rtol=2e-4)

    config, params = prune.prune_mlp(llm.runner.state, llm.config, got, remove_fraction=0.3)
    keep = 72  # 96 * 0.7 = 67.2, rounded up to a multiple of 8
    assert config.intermediate_size == keep and config.num_params < llm.config.num_params
    before = prune.host_params(llm.runner.state)
    for layer in range(2):
        order = np.argsort(-expected[layer])
        # The reference ranking is unambiguous at the cut, so float noise cannot flip it.
        assert expected[layer, order[keep - 1]] > expected[layer, order[keep]] * (1 + 1e-3)
        kept = np.sort(order[:keep])
        name = f"layers.{layer}.mlp."
        np.testing.assert_array_equal(params[name + "w_gate"], before[name + "w_gate"][kept])
        np.testing.assert_array_equal(params[name + "w_up"], before[name + "w_up"][kept])
        np.testing.assert_array_equal(params[name + "w_down"], before[name + "w_down"][:, kept])
    unchanged = [n for n in before if ".mlp.w_" not in n]
    assert all(np.array_equal(params[n], before[n]) for n in unchanged)


def test_keeping_every_channel_reproduces_the_logits_exactly(llm):
    importance = prune.mlp_channel_importance(llm, windows(1))
    ids = windows(2, n=1, length=40)[0].tolist()
    with prune.pruned_llm(llm, importance, remove_fraction=0.0) as same:
        assert same.config == llm.config
        np.testing.assert_array_equal(same.logits(ids), llm.logits(ids))


def test_channels_and_heads_that_contribute_nothing_are_removed_without_changing_the_output(
    llm,
):
    """With a quarter of the MLP channels' output columns and one query head per KV group's
    output projection zeroed, those score 0, and pruning 25% of the channels and half the
    heads removes exactly them: the output stays the same, which also checks that gate, up
    and down (and wq and wo) are cut at the same indices."""
    params = prune.host_params(llm.runner.state)
    dead = np.random.default_rng(3).permutation(F)[: F // 4]
    dead_heads = [1, 2]  # 4 query heads in 2 groups: one of each group
    for layer in range(2):
        params[f"layers.{layer}.mlp.w_down"][:, dead] = 0.0
        params[f"layers.{layer}.attn.wo"][:, dead_heads] = 0.0
    full = prune.place(params, llm.runner.spec)
    scores = prune.importance(full, windows(4))
    assert np.all(scores.mlp[:, dead] == 0) and np.all(np.delete(scores.mlp, dead, 1) > 0)
    assert np.all(scores.heads[:, dead_heads] == 0) and np.all(scores.heads[:, [0, 3]] > 0)
    config, small = prune.prune(params, llm.config, scores, mlp_fraction=0.25, heads_fraction=0.5)
    assert config.intermediate_size == F - len(dead)
    assert (config.num_heads, config.num_kv_heads) == (2, 2)
    pruned = prune.place(small, dataclasses.replace(llm.runner.spec, config=config))
    eval_windows = windows(5, n=2, length=33)
    assert prune.perplexity(pruned, eval_windows) == pytest.approx(
        prune.perplexity(full, eval_windows), rel=1e-5
    )


def test_heads_without_grouping_go_with_their_key_value_heads():
    """One query head per KV head (N = K): a removed head takes its key/value head along."""
    config = jaxllm.ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=8,
        max_position_embeddings=64,
    )
    spec = ModelSpec(config, np.float32, ONE_DEVICE, DEFAULT_RULES)  # quicker to compile
    params = prune.host_params(spec.random_state(0)[1])
    for layer in range(2):
        params[f"layers.{layer}.attn.wo"][:, layer] = 0.0  # head 0 in layer 0, head 1 in 1
    full = prune.place(params, spec)
    tokens = np.random.default_rng(6).integers(0, 64, (2, 17), dtype=np.int32)
    scores = prune.importance(full, tokens[:, :16])
    small_config, small = prune.prune(params, config, scores, mlp_fraction=0.0, heads_fraction=0.25)
    assert (small_config.num_heads, small_config.num_kv_heads) == (3, 3)
    np.testing.assert_array_equal(small["layers.1.attn.wk"], params["layers.1.attn.wk"][[0, 2, 3]])
    pruned = prune.place(small, dataclasses.replace(spec, config=small_config))
    assert prune.perplexity(pruned, tokens) == pytest.approx(
        prune.perplexity(full, tokens), rel=1e-5
    )


def test_pruned_checkpoint_loads_on_an_8_device_mesh_and_generates(
    tiny, calibration_file, tmp_path, monkeypatch
):
    record = prune.prune_checkpoint(
        tiny[2],
        tmp_path / "half",
        mlp_fraction=0.5,
        heads_fraction=0.5,
        calibration_text=[calibration_file.read_text()],
        eval_text=[Path(hf_models.__file__).read_text()],
        calibration_windows=4,
        eval_windows=2,
        mesh=ONE_DEVICE,  # pruned on one device, served on eight below
        log=lambda line: None,
    )
    assert record["intermediate_size"] == {"before": F, "after": 48}
    assert record["num_heads"] == {"before": 4, "after": 2} and record["num_kv_heads"]["after"] == 2
    assert np.isfinite(record["perplexity"]["before"]) and np.isfinite(
        record["perplexity"]["after"]
    )
    assert json.loads((tmp_path / "half" / prune.PRUNING_FILE).read_text()) == record
    assert oc.read_config(tmp_path / "half").intermediate_size == 48
    assert oc.read_config(tmp_path / "half").num_heads == 2
    source = prune.host_params(oc.load_orbax_state(tiny[2], _spec_of(tiny[2]))[1])
    kept = np.asarray(record["kept"]["mlp_channels"])
    monkeypatch.chdir(tmp_path)  # a relative path, as `jaxllm generate --model half` gives
    with jaxllm.LLM.load(Path("half"), mesh=MESH, warm_up=False, max_num_seqs=2) as small:
        assert small.config.intermediate_size == 48
        w_up = named_params(small.runner.state)["layers.1.mlp.w_up"].value()
        assert len(w_up.sharding.device_set) == 8 and not w_up.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(w_up), source["layers.1.mlp.w_up"][kept[1]])
        out = small.generate("def f(x):", max_tokens=8, temperature=0, ignore_eos=True)
        assert len(out.token_ids) == 8 and out.finish_reason == "length"


def _spec_of(path):
    return ModelSpec(oc.read_config(path), np.float32, make_mesh(MESH), DEFAULT_RULES)


def test_cli_prunes_a_checkpoint_and_reports_the_quality_cost(
    tiny, calibration_file, tmp_path, capsys
):
    out = tmp_path / "pruned"
    args = ["prune", str(out), "--model", str(tiny[2]), "--mesh", "data=2,tensor=4"]
    args += ["--mlp-fraction", "0.25", "--calibration", str(calibration_file)]
    assert cli.main([*args, "--calibration-windows", "5", "--eval-windows", "2"]) == 0
    printed = capsys.readouterr().out
    assert "MLP width: 96 -> 72" in printed and "held-out perplexity" in printed, printed
    record = json.loads((out / prune.PRUNING_FILE).read_text())
    # No --eval: the last fifth of the calibration text scores, and is not calibrated on.
    assert record["perplexity"]["source"].startswith("last fifth")
    assert record["calibration"]["tokens"] == 5 * 256 and record["perplexity"]["tokens"] == 2 * 256
    assert record["params"]["after"] == oc.read_config(out).num_params
    assert record["measure"] == {"mlp": prune.MEASURE, "heads": prune.HEAD_MEASURE}


@pytest.mark.parametrize(
    "case, message",
    [
        ("fraction 1", "must be in [0, 1)"),
        ("negative fraction", "must be in [0, 1)"),
        ("multiple 0", "multiple must be a positive"),
        ("no calibration", "give calibration text"),
        ("Hugging Face source", "not a jaxllm Orbax checkpoint"),
        ("output exists", "exists and is not empty"),
    ],
)
def test_bad_input_gets_a_clear_error(tiny, calibration_file, tmp_path, capsys, case, message):
    out, model, fraction = tmp_path / "out", tiny[2], "0.5"
    extra = ["--calibration", str(calibration_file)]
    if case == "fraction 1":
        fraction = "1.0"
    elif case == "negative fraction":
        fraction = "-0.1"
    elif case == "multiple 0":
        extra += ["--multiple", "0"]
    elif case == "no calibration":
        extra = []
    elif case == "Hugging Face source":
        model = tiny[1]
    elif case == "output exists":
        out.mkdir()
        (out / "something").write_text("")
    args = ["prune", str(out), "--model", str(model), "--mlp-fraction", fraction, *extra]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (out / oc.METADATA_FILE).exists()


def test_kept_width_rounds_up_to_the_multiple_and_checks_its_input():
    assert prune.kept_width(768, 0.25) == 576 and prune.kept_width(768, 0.5) == 384
    assert prune.kept_width(100, 0.5, 8) == 56  # never removes more than asked
    assert prune.kept_width(14336, 0.25, 128) == 10752
    assert prune.kept_width(8, 0.9, 8) == 8
    with pytest.raises(ValueError, match="keep 0 of"):
        prune.kept_channels(np.ones((2, 8)), 0)
    with pytest.raises(ValueError, match="importance has shape"):
        prune.prune_mlp({}, jaxllm.ModelConfig(num_layers=2), np.ones((2, 8)), remove_fraction=0.5)


def test_demo_heldout_files_are_rebuilt_from_this_stdlib():
    try:
        files = demo.heldout_files()
    except FileNotFoundError as e:
        pytest.skip(str(e))  # another Python version: its stdlib is another corpus
    sample = [f["file"] for f in json.loads(HELDOUT_SAMPLE.read_text())["files"]]
    stdlib = files[0].parents[len(Path(sample[0]).parts) - 1]
    names = {str(p.relative_to(stdlib)) for p in files}
    assert set(sample) <= names and len(files) == demo.training_record()["heldout_files"]


def test_demo_model_pruned_by_importance_beats_random_channels(capsys):
    """A real check of the measure: on held-out text, removing the 25% of channels it scores
    lowest costs far less perplexity than removing random ones."""
    files = [f["text"] for f in json.loads(HELDOUT_SAMPLE.read_text())["files"]]
    # One device: this checks the measure, not sharding, and compiles much faster.
    with jaxllm.LLM.load(mesh=ONE_DEVICE, warm_up=False, max_num_seqs=1) as full:
        calib = prune.token_windows(full.tokenizer, files[1::2], 256)
        heldout = prune.token_windows(full.tokenizer, files[::2], 257, stride=256)
        ppl = {"full": prune.perplexity(full, heldout)}
        scores = {"importance": prune.mlp_channel_importance(full, calib)}
        scores["random"] = prune.random_importance(full.config, seed=0).mlp
        for name, importance in scores.items():
            with prune.pruned_llm(full, importance, remove_fraction=0.25) as small:
                assert small.config.intermediate_size == 576
                ppl[name] = prune.perplexity(small, heldout)
    with capsys.disabled():
        print(
            f"\ndemo model, 25% of MLP channels removed, held-out perplexity: {ppl}",
            file=sys.stderr,
        )
    assert all(np.isfinite(v) for v in ppl.values())
    assert ppl["importance"] < 1.03 * ppl["full"]
    assert ppl["importance"] < ppl["random"]
