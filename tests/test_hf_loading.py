"""Loading Hugging Face folders: clear errors for what cannot be served faithfully, sharded and
half-precision checkpoints, and the host memory that loading a 500 MB model takes."""

import copy
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import hf_models
import jaxllm
from jaxllm import CheckpointError, ConfigError
from jaxllm.config import ModelConfig
from jaxllm.hf_checkpoint import load_hf_state
from jaxllm.params import ModelSpec, named_params
from jaxllm.runtime import ModelRunner
from jaxllm.tokenizer import byte_level_tokenizer
from sharding import DEFAULT_RULES, make_mesh

REPO = Path(__file__).resolve().parents[1]
T = 32  # prompt tokens: one shape, so every forward compiles once
WEIGHTS = "model.safetensors"


def one_device_spec(path: Path, dtype=jnp.float32) -> ModelSpec:
    mesh = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    return ModelSpec(ModelConfig.from_hf_dir(path), dtype, mesh, DEFAULT_RULES)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A single-file llama3_gqa folder with a tokenizer, a one-device runner on it, a prompt
    and transformers' float32 logits for that prompt."""
    path = tmp_path_factory.mktemp("llama")
    model = hf_models.write("llama3_gqa", path)
    byte_level_tokenizer().save(path)
    ids = np.random.default_rng(5).integers(0, 320, size=(1, T))
    spec = one_device_spec(path)
    runner = ModelRunner(spec, *load_hf_state(path, spec))
    return path, model, runner, ids, hf_models.torch_logits(model, ids).numpy()[0]


def logits_with(runner: ModelRunner, state, ids) -> np.ndarray:
    """[T, V] logits of ``runner``'s model with the weights in ``state`` (same tree and
    shardings as the runner's own, so the compiled forward is reused)."""
    params = jax.tree.leaves(state)
    logits = runner.forward(params, jnp.asarray(ids), jnp.arange(T)[None])
    return np.asarray(logits[0])


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(folder: Path, edit) -> None:
    """Rewrites ``folder/model.safetensors`` after ``edit`` changed its name -> array dict."""
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def edit_config(folder: Path, edit) -> None:
    raw = json.loads((folder / "config.json").read_text())
    edit(raw)
    (folder / "config.json").write_text(json.dumps(raw))


# -- folders and config.json -----------------------------------------------------------------


def test_folder_without_config_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        ModelConfig.from_hf_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        jaxllm.LLM.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        jaxllm.LLM.load(tmp_path / "no-such-model")


def test_unknown_architecture_is_rejected_by_name(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    byte_level_tokenizer().save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
        "GPT2LMHeadModel"
    ]
    with pytest.raises(ConfigError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ModelConfig.from_hf_dir(tmp_path)
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        jaxllm.LLM.load(tmp_path)


def test_unknown_model_type_without_architectures_is_rejected_by_name(llama, tmp_path):
    folder = copy_folder(llama[0], tmp_path / "m")

    def as_gemma(raw):
        del raw["architectures"]
        raw["model_type"] = "gemma"

    edit_config(folder, as_gemma)
    with pytest.raises(ConfigError, match="model_type='gemma' is not supported"):
        ModelConfig.from_hf_dir(folder)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
        (
            dict(
                rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
            ),
            "rope_scaling type 'yarn' is not supported",
        ),
        (dict(mlp_bias=True), "mlp_bias=True is not supported"),
    ],
    ids=["hidden_act", "yarn", "mlp_bias"],
)
def test_math_changing_fields_written_by_transformers_are_rejected_by_name(
    tmp_path, overrides, message
):
    hf_models.write("llama2", tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dir(tmp_path)


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_legacy_rope_scaling_entry_is_read_or_rejected(llama, tmp_path, kind):
    """transformers 4 wrote ``rope_scaling`` with ``type`` and no ``rope_parameters``:
    read where the runtime implements the scaling (linear), refused by name otherwise."""
    folder = copy_folder(llama[0], tmp_path / "m")

    def legacy(raw):
        raw.pop("rope_parameters")
        raw["rope_theta"] = 500000.0
        raw["rope_scaling"] = {"type": kind, "factor": 2.0}

    edit_config(folder, legacy)
    if kind == "dynamic":
        with pytest.raises(ConfigError, match="rope_scaling type 'dynamic' is not supported"):
            ModelConfig.from_hf_dir(folder)
        return
    config = ModelConfig.from_hf_dir(folder)
    assert config.rope_theta == 500000.0
    assert (config.rope_scaling.rope_type, config.rope_scaling.factor) == ("linear", 2.0)


# -- safetensors contents -------------------------------------------------------------------


def test_missing_tensor_is_named(llama, tmp_path):
    folder = copy_folder(llama[0], tmp_path / "m")
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.1\.mlp\.up_proj"):
        load_hf_state(folder, one_device_spec(folder))


def test_tensor_of_the_wrong_shape_is_named_with_both_shapes(llama, tmp_path):
    folder = copy_folder(llama[0], tmp_path / "m")
    name = "model.layers.0.self_attn.k_proj.weight"  # 2 KV heads of 16: [32, 64]

    def widen(tensors):
        tensors[name] = np.zeros((64, 64), np.float32)

    rewrite_weights(folder, widen)
    expected = f"'{name}' has shape [64, 64], expected [32, 64]"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_hf_state(folder, one_device_spec(folder))


@pytest.mark.parametrize("keep", ["all_but_one_byte", "half_the_data", "inside_header"])
def test_truncated_file_is_reported_as_truncated(llama, tmp_path, keep):
    folder = copy_folder(llama[0], tmp_path / "m")
    file = folder / WEIGHTS
    size = file.stat().st_size
    (header_len,) = struct.unpack("<Q", file.read_bytes()[:8])
    data_start = 8 + header_len
    new_size = {
        "all_but_one_byte": size - 1,
        "half_the_data": (data_start + size) // 2,
        "inside_header": 8 + header_len // 2,
    }[keep]
    with open(file, "r+b") as f:
        f.truncate(new_size)
    with pytest.raises(CheckpointError) as raised:
        load_hf_state(folder, one_device_spec(folder))
    # The folder's name comes from this test's name, which says "truncated" itself.
    message = str(raised.value).replace(str(folder), "<folder>")
    assert message.startswith(f"<folder>/{WEIGHTS}: ") and "truncated" in message


@pytest.mark.parametrize(
    "extra",
    ["model.layers.0.mlp.gate_proj.bias", "model.layers.2.input_layernorm.weight"],
    ids=["bias_the_config_lacks", "layer_past_num_hidden_layers"],
)
def test_unexpected_tensor_is_refused_by_name(llama, tmp_path, extra):
    folder = copy_folder(llama[0], tmp_path / "m")

    def add(tensors):
        tensors[extra] = np.ones((64,), np.float32)

    rewrite_weights(folder, add)
    with pytest.raises(CheckpointError, match=re.escape(extra)):
        load_hf_state(folder, one_device_spec(folder))


def test_tensor_stored_in_two_files_is_refused_by_name(llama, tmp_path):
    """Without an index, every *.safetensors file is read; a stray file that repeats a tensor
    makes the folder ambiguous, and which copy is served must not depend on file names."""
    folder = copy_folder(llama[0], tmp_path / "m")
    norm = load_file(folder / WEIGHTS)["model.norm.weight"]
    save_file({"model.norm.weight": np.zeros_like(norm)}, folder / "stale.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        load_hf_state(folder, one_device_spec(folder))


def test_stored_rotary_inv_freq_is_ignored(llama, tmp_path):
    """Some exporters store the RoPE frequencies; they carry nothing and must not block."""
    path, _, runner, ids, expected = llama
    folder = copy_folder(path, tmp_path / "m")

    def add(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((8,), np.float32)

    rewrite_weights(folder, add)
    _, state = load_hf_state(folder, one_device_spec(folder))
    assert np.abs(logits_with(runner, state, ids) - expected).max() <= 1e-4


def test_folder_without_safetensors_is_a_clear_error(llama, tmp_path):
    folder = copy_folder(llama[0], tmp_path / "m")
    (folder / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        load_hf_state(folder, one_device_spec(folder))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        jaxllm.LLM.load(folder)


def test_mesh_that_does_not_fit_the_devices_says_how_many(llama):
    assert len(jax.devices()) == 8
    with pytest.raises(ValueError, match="needs 3 devices but 8 are available"):
        jaxllm.LLM.load(llama[0], mesh={"data": 3})


# -- sharded checkpoints --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(llama, tmp_path_factory):
    """The same model as ``llama``, saved by transformers in many small files plus an index."""
    path = tmp_path_factory.mktemp("sharded")
    llama[1].save_pretrained(path, max_shard_size="20KB")
    byte_level_tokenizer().save(path)
    return path


def test_transformers_wrote_a_sharded_checkpoint(sharded):
    shards = sorted(sharded.glob("*.safetensors"))
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(shards) > 5 and not (sharded / WEIGHTS).exists()
    assert {name for name in weight_map.values()} == {p.name for p in shards}


def test_sharded_checkpoint_gives_the_single_file_logits(llama, sharded):
    _, _, runner, ids, expected = llama
    single = logits_with(runner, runner.state, ids)
    _, state = load_hf_state(sharded, one_device_spec(sharded))
    got = logits_with(runner, state, ids)
    np.testing.assert_array_equal(got, single)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(expected).max() > 0.5  # not a comparison of near-zero logits


def test_sharded_checkpoint_loads_across_a_device_mesh(llama, sharded):
    _, _, _, ids, expected = llama
    # No warm-up: only the scoring forward runs (the default engine has 31 step shapes).
    with jaxllm.LLM.load(
        sharded, mesh={"fsdp": 2, "tensor": 4}, rules="fsdp_tensor", warm_up=False
    ) as llm:
        w_up = named_params(llm.runner.state)["layers.0.mlp.w_up"].value()
        assert w_up.sharding.spec == jax.P("tensor", "fsdp")  # really split, not replicated
        assert np.abs(llm.logits(ids[0].tolist()) - expected).max() <= 1e-4


def test_index_naming_a_missing_file_is_a_clear_error(sharded, tmp_path):
    folder = copy_folder(sharded, tmp_path / "m")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-00099-of-00099\.safetensors.*not exist"):
        load_hf_state(folder, one_device_spec(folder))


def test_index_placing_a_tensor_in_the_wrong_file_is_a_clear_error(sharded, tmp_path):
    folder = copy_folder(sharded, tmp_path / "m")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    wrong = next(f for f in sorted(set(weight_map.values())) if f != weight_map["lm_head.weight"])
    weight_map["lm_head.weight"] = wrong
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"'lm_head\.weight' in {re.escape(wrong)}"):
        load_hf_state(folder, one_device_spec(folder))


# -- half-precision checkpoints -------------------------------------------------------------


@pytest.mark.parametrize(
    "torch_dtype, stored", [(torch.bfloat16, "BF16"), (torch.float16, "F16")], ids=str
)
def test_half_precision_checkpoint_matches_transformers_on_the_rounded_weights(
    llama, tmp_path, torch_dtype, stored
):
    _, model, runner, ids, full_precision = llama
    copy.deepcopy(model).to(torch_dtype).save_pretrained(tmp_path)
    (header_len,) = struct.unpack("<Q", (tmp_path / WEIGHTS).read_bytes()[:8])
    header = json.loads((tmp_path / WEIGHTS).read_bytes()[8 : 8 + header_len])
    assert header["lm_head.weight"]["dtype"] == stored
    # The reference rounds the parameters only: Module.to would also round RoPE's inv_freq.
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch_dtype))
    expected = hf_models.torch_logits(rounded, ids).numpy()[0]
    # Rounding moved the logits visibly, so matching them shows the stored values were used.
    assert np.abs(expected - full_precision).max() > 1e-3

    _, state = load_hf_state(tmp_path, one_device_spec(tmp_path))
    assert np.abs(logits_with(runner, state, ids) - expected).max() <= 1e-4


def test_bfloat16_checkpoint_into_bfloat16_params_is_bit_exact(llama, tmp_path):
    model = copy.deepcopy(llama[1]).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    _, state = load_hf_state(tmp_path, one_device_spec(tmp_path, jnp.bfloat16))
    params = {k: np.asarray(v.value()) for k, v in named_params(state).items()}
    assert {p.dtype for p in params.values()} == {np.dtype(ml_dtypes.bfloat16)}

    def hf(name):
        return model.get_parameter(name).detach().float().numpy().astype(ml_dtypes.bfloat16)

    np.testing.assert_array_equal(params["embed"], hf("model.embed_tokens.weight"))
    np.testing.assert_array_equal(
        params["layers.1.mlp.w_up"], hf("model.layers.1.mlp.up_proj.weight")
    )
    # [N, H, D] from q_proj's [N * H, D]
    wq = hf("model.layers.1.self_attn.q_proj.weight").reshape(4, 16, 64)
    np.testing.assert_array_equal(params["layers.1.attn.wq"], wq)


# -- host memory ----------------------------------------------------------------------------


MEASURE_LOAD = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, psutil
from jaxllm.config import ModelConfig
from jaxllm.hf_checkpoint import HFCheckpoint, load_hf_state
from jaxllm.params import ModelSpec
from sharding import DEFAULT_RULES, make_mesh

path = sys.argv[1]
assert len(jax.devices()) == 1
spec = ModelSpec(ModelConfig.from_hf_dir(path), jnp.float32, make_mesh(), DEFAULT_RULES)
files = HFCheckpoint(path).files.values()
sizes = [f.nbytes(name) for f in files for name in f.entries]
spec.abstract()  # imports and traces everything loading needs before the baseline
# The kernel's high-water mark, reset here (ru_maxrss would include the RSS that the pytest
# parent had when it forked this process).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
baseline = psutil.Process().memory_info().rss
_, state = load_hf_state(path, spec)
jax.block_until_ready(jax.tree.leaves(state))
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps(dict(
    peak_over_baseline=peak - baseline, model_bytes=sum(sizes), largest_tensor=max(sizes),
    loaded_bytes=sum(x.nbytes for x in jax.tree.leaves(state)),
)))
"""


def run_python(script: str, *args: str) -> str:
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_loading_holds_at_most_a_few_tensors_beyond_the_model_on_the_host(tmp_path):
    """A loader that built the state dict on the host first would peak near twice the
    model (measured by hand: 1025 MiB over baseline for this 512 MiB model, against a bound
    of 695 MiB); tensor-by-tensor loading stays near the model itself."""
    run_python(hf_models.WRITE_BIG_MODEL, str(tmp_path))
    got = json.loads(run_python(MEASURE_LOAD, str(tmp_path)).splitlines()[-1])
    mb = {k: round(v / 2**20, 1) for k, v in got.items()}
    print(f"\nhost memory while loading (MiB): {mb}")
    assert got["model_bytes"] >= 500e6 and got["largest_tensor"] <= 12.5e6
    assert got["loaded_bytes"] == got["model_bytes"]
    bound = got["model_bytes"] + 3 * got["largest_tensor"] + 150 * 2**20
    assert got["peak_over_baseline"] <= bound
