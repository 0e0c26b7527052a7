"""jaxllm's Orbax checkpoints: Hugging Face conversion, restore into any mesh, save from a live
state, clear errors for broken checkpoints, and the host memory conversion and restore take."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import hf_models
from jaxllm import CheckpointError, head_layout
from jaxllm import orbax_checkpoint as oc
from jaxllm.config import ModelConfig
from jaxllm.hf_checkpoint import load_hf_state
from jaxllm.params import ModelSpec, named_params
from jaxllm.runtime import ModelRunner
from jaxllm.tokenizer import Tokenizer, byte_level_tokenizer
from sharding import DEFAULT_RULES, make_mesh

REPO = Path(__file__).resolve().parents[1]
T = 16  # prompt tokens
MESHES = [{"tensor": 8}, {"data": 2, "tensor": 4}, {"fsdp": 4, "tensor": 2}]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def spec_for(config: ModelConfig, mesh=None, dtype=jnp.float32) -> ModelSpec:
    if mesh is None:
        mesh = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    return ModelSpec(config, dtype, make_mesh(mesh), DEFAULT_RULES)


def arrays(state) -> dict[str, jax.Array]:
    return {k: v.value() for k, v in named_params(state).items()}


def assert_same_arrays(got, expected) -> None:
    got, expected = arrays(got), arrays(expected)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name]), name)


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def largest_data_file(ckpt: Path, name: str) -> Path:
    files = [f for f in (ckpt / "arrays" / name).rglob("*") if f.is_file() and f.parent.name == "d"]
    return max(files, key=lambda f: f.stat().st_size)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A Hugging Face folder written by transformers: 8 query and 4 KV heads (so that some
    meshes split heads and some cannot), a tokenizer and a chat template."""
    path = tmp_path_factory.mktemp("hf")
    hf_models.write("llama3_gqa", path, num_attention_heads=8, num_key_value_heads=4)
    byte_level_tokenizer().save(path)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "ckpt"
    seen = []
    assert oc.convert_hf_to_orbax(hf_dir, out, on_tensor=lambda n, b: seen.append((n, b))) == out
    config = ModelConfig.from_hf_dir(hf_dir)
    assert [n for n, _ in seen] == sorted(named_params(spec_for(config).abstract()[1]))
    assert sum(b for _, b in seen) == config.num_params * 4
    return out


# -- conversion and restore ------------------------------------------------------------------


def test_conversion_carries_config_tokenizer_dtype_and_version(hf_dir, converted):
    assert oc.is_orbax_checkpoint(converted)
    meta = oc.read_metadata(converted)
    assert meta["format_version"] == oc.FORMAT_VERSION == 2 and meta["dtype"] == "float32"
    config = oc.read_config(converted)
    assert config == ModelConfig.from_hf_dir(hf_dir)
    assert set(meta["params"]) == set(named_params(spec_for(config).abstract()[1]))
    assert meta["params"]["layers.0.attn.wk"] == {"shape": [4, 8, 64], "dtype": "float32"}

    folder = oc.tokenizer_dir(converted)
    copied = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= copied
    assert "generation_config.json" in copied  # written by transformers' save_pretrained
    ours, theirs = Tokenizer.from_dir(folder), Tokenizer.from_dir(hf_dir)
    text = "héllo, wörld"
    assert ours.encode(text) == theirs.encode(text) and ours.decode(ours.encode(text)) == text
    assert ours.eos_ids == theirs.eos_ids == {257} and ours.bos_id == theirs.bos_id == 256
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat) == "<user>hi"
    # Nothing but the checkpoint was left next to it (no temporary folders).
    assert [p.name for p in converted.parent.iterdir()] == ["ckpt"]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_restore_into_any_mesh_gives_the_hf_logits_and_target_shardings(hf_dir, converted, mesh):
    spec = spec_for(oc.read_config(converted), mesh)
    runner = ModelRunner(spec, *load_hf_state(hf_dir, spec))
    placed = []
    _, state = oc.load_orbax_state(converted, spec, on_tensor=lambda n, b: placed.append(b))
    assert sum(placed) == spec.config.num_params * 4

    targets = {name: target.sharding for name, target in spec.targets().items()}
    split = 0
    for name, array in arrays(state).items():
        assert array.sharding == targets[name], name
        expected_block = targets[name].shard_shape(array.shape)
        assert {s.data.shape for s in array.addressable_shards} == {expected_block}, name
        split += expected_block != array.shape
    assert split >= 10  # most parameters are really split on every one of these meshes
    assert_same_arrays(state, runner.state)

    ids = np.random.default_rng(0).integers(0, 320, size=(1, T))

    def logits(params):
        out = runner.forward(params, jnp.asarray(ids), jnp.arange(T)[None])
        return np.asarray(out[0])

    expected = logits(runner.params)
    assert np.abs(expected).max() > 0.5  # not a comparison of near-zero logits
    np.testing.assert_allclose(logits(jax.tree.leaves(state)), expected, rtol=0, atol=1e-6)


def test_bfloat16_conversion_stores_bfloat16(hf_dir, converted, tmp_path):
    out = oc.convert_hf_to_orbax(hf_dir, tmp_path / "bf16", dtype="bfloat16")
    meta = oc.read_metadata(out)
    assert meta["dtype"] == "bfloat16"
    assert {p["dtype"] for p in meta["params"].values()} == {"bfloat16"}

    # Halved on disk, not cast at restore time.
    size = largest_data_file(out, "embed").stat().st_size
    assert (
        320 * 64 * 2 <= size < 320 * 64 * 4 <= largest_data_file(converted, "embed").stat().st_size
    )
    config = oc.read_config(out)
    spec = spec_for(config, dtype=jnp.bfloat16)
    _, state = oc.load_orbax_state(out, spec)
    assert_same_arrays(state, load_hf_state(hf_dir, spec)[1])  # the same rounding
    # Served in float32 (as on CPU), the values are the stored bfloat16 ones.
    _, wide = oc.load_orbax_state(out, spec_for(config))
    for name, array in arrays(wide).items():
        assert array.dtype == jnp.float32
        rounded = np.asarray(arrays(state)[name]).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(array), rounded, name)


def test_sharded_hf_checkpoint_converts_to_the_same_arrays(hf_dir, converted, tmp_path):
    model = hf_models.build("llama3_gqa", num_attention_heads=8, num_key_value_heads=4)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 5
    out = oc.convert_hf_to_orbax(tmp_path / "hf", tmp_path / "ckpt")
    spec = spec_for(oc.read_config(out))
    assert_same_arrays(oc.load_orbax_state(out, spec)[1], oc.load_orbax_state(converted, spec)[1])


def stored_layout(state, spec: ModelSpec) -> dict[str, np.ndarray]:
    """``state``'s arrays on the host in the checkpoint's head layout: a mesh may copy or
    pad attention heads (``jaxllm.head_layout``), differently on different meshes."""
    layout, out = spec.config.head_layout, {}
    for name, array in arrays(state).items():
        value = np.asarray(array)
        if layout is not None:
            value = head_layout.shrink_host(value, layout, spec.logical_axes[name])
        out[name] = value
    return out


def test_live_sharded_state_saved_and_restored_on_another_mesh(converted, tmp_path):
    config = oc.read_config(converted)
    source = spec_for(config, {"fsdp": 4, "tensor": 2})
    _, state = oc.load_orbax_state(converted, source)
    tuned = jax.tree.map(lambda x: x * 1.5 + 0.25, state)  # stands in for fine-tuning
    w_up = arrays(tuned)["layers.0.mlp.w_up"]
    assert w_up.sharding.spec == jax.P("tensor", "fsdp")  # saved from 8 shards

    saved = []
    out = oc.save_state(
        tuned,
        config,
        tmp_path / "tuned",
        tokenizer_dir=oc.tokenizer_dir(converted),
        on_tensor=lambda n, b: saved.append(n),
    )
    assert oc.is_orbax_checkpoint(out) and len(saved) == len(arrays(state))
    assert oc.read_config(out) == config
    spec = spec_for(config, {"tensor": 8})
    _, restored = oc.load_orbax_state(out, spec)
    # The two meshes lay out the 4 KV heads differently (copied on tensor=8 only).
    assert spec.config.num_kv_heads != source.config.num_kv_heads
    got, expected = stored_layout(restored, spec), stored_layout(tuned, source)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, name)
    assert arrays(restored)["layers.0.mlp.w_up"].sharding.spec == jax.P("tensor")
    tokenizer = Tokenizer.from_dir(oc.tokenizer_dir(out))
    assert tokenizer.encode("abc") == Tokenizer.from_dir(oc.tokenizer_dir(converted)).encode("abc")
    with pytest.raises(FileExistsError, match="not empty"):
        oc.save_state(tuned, config, out)


def test_save_state_refuses_a_state_that_does_not_match_the_config(converted, tmp_path):
    config = oc.read_config(converted)
    _, state = oc.load_orbax_state(converted, spec_for(config))
    other = dataclasses.replace(config, intermediate_size=128)
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.w_down' has shape \(64, 96\)"):
        oc.save_state(state, other, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- checkpoints that must not be served -----------------------------------------------------


def test_missing_array_folder_is_named(converted, tmp_path):
    ckpt = copy_folder(converted, tmp_path / "c")
    shutil.rmtree(ckpt / "arrays" / "layers.1.mlp.w_up")
    spec = spec_for(oc.read_config(ckpt))
    with pytest.raises(CheckpointError, match=r"parameter 'layers\.1\.mlp\.w_up' is missing"):
        oc.load_orbax_state(ckpt, spec)


def test_missing_array_data_files_are_named(converted, tmp_path):
    ckpt = copy_folder(converted, tmp_path / "c")
    name = "layers.0.attn.wq"
    data = [f for f in (ckpt / "arrays" / name).rglob("*") if f.parent.name == "d"]
    assert data
    for file in data:
        file.unlink()
    with pytest.raises(CheckpointError, match=rf"cannot read parameter '{name}'"):
        oc.load_orbax_state(ckpt, spec_for(oc.read_config(ckpt)))


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.9])
def test_truncated_array_file_is_an_error(converted, tmp_path, keep):
    ckpt = copy_folder(converted, tmp_path / "c")
    name = "embed"  # [320, 64] float32: 80 KiB, the largest data file of the model
    file = largest_data_file(ckpt, name)
    size = file.stat().st_size
    assert size > 320 * 64 * 4
    with open(file, "r+b") as f:
        f.truncate(int(keep * 320 * 64 * 4))
    with pytest.raises(CheckpointError, match=rf"cannot read parameter '{name}'") as raised:
        oc.load_orbax_state(ckpt, spec_for(oc.read_config(ckpt)))
    assert str(ckpt / "arrays" / name) in str(raised.value)


def test_config_that_does_not_match_the_arrays_is_refused_with_both_shapes(converted):
    config = dataclasses.replace(oc.read_config(converted), intermediate_size=128)
    expected = (
        "'layers.0.mlp.w_down' is stored as float32[64, 96]; "
        "this model config needs float32[64, 128]"
    )
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        oc.load_orbax_state(converted, spec_for(config))


def test_array_of_the_wrong_shape_on_disk_is_refused(converted, tmp_path):
    """The metadata file agrees with the model, but the array written under a parameter's name
    has another shape: Orbax must not pad or truncate it into place."""
    ckpt = copy_folder(converted, tmp_path / "c")
    name = "layers.0.attn.wk"  # [4, 8, 64]
    shutil.rmtree(ckpt / "arrays" / name)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt / "arrays" / name, {name: np.ones((2, 8, 64), np.float32)})
    checkpointer.close()
    with pytest.raises(CheckpointError, match=rf"cannot read parameter '{name}'.*shape"):
        oc.load_orbax_state(ckpt, spec_for(oc.read_config(ckpt)))


def test_unknown_format_version_is_refused(converted, tmp_path):
    ckpt = copy_folder(converted, tmp_path / "c")
    file = ckpt / oc.METADATA_FILE
    meta = json.loads(file.read_text())
    meta["format_version"] = 99
    file.write_text(json.dumps(meta))
    assert oc.is_orbax_checkpoint(ckpt)  # it is one, just not one this jaxllm reads
    with pytest.raises(CheckpointError, match="version 99 is not readable by this jaxllm"):
        oc.read_metadata(ckpt)
    with pytest.raises(CheckpointError, match="version 99"):
        oc.load_orbax_state(ckpt, spec_for(oc.read_config(converted)))


def test_folder_that_is_not_a_checkpoint_is_refused(hf_dir, converted, tmp_path):
    spec = spec_for(oc.read_config(converted))
    for folder in (hf_dir, tmp_path):
        assert not oc.is_orbax_checkpoint(folder)
        with pytest.raises(CheckpointError, match="is not a jaxllm Orbax checkpoint"):
            oc.load_orbax_state(folder, spec)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        oc.read_metadata(tmp_path / "nothing-here")


def test_interrupted_conversion_leaves_no_checkpoint(hf_dir, tmp_path):
    out = tmp_path / "ckpt"

    def stop_midway(name, nbytes):
        if name.startswith("layers.1"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        oc.convert_hf_to_orbax(hf_dir, out, on_tensor=stop_midway)
    assert not oc.is_orbax_checkpoint(out)
    assert list(tmp_path.iterdir()) == []  # nor a temporary folder that could be mistaken

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        oc.convert_hf_to_orbax(hf_dir, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


# -- host memory ----------------------------------------------------------------------------


# Peak RSS since a reset, from the kernel's high-water mark of this process. (ru_maxrss is no
# good here: a child process inherits the RSS its parent had when it forked.)
PEAK_RSS = """
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
"""

# Both measurements first run the same operation on the small model, so that one-time set-up
# (Orbax's thread pools, JAX tracing) is part of the baseline rather than of the peak.
MEASURE_CONVERT = (
    PEAK_RSS
    + """
import json, sys
import psutil
from jaxllm.hf_checkpoint import HFCheckpoint
from jaxllm.orbax_checkpoint import convert_hf_to_orbax

small, small_out, big, big_out = sys.argv[1:]
convert_hf_to_orbax(small, small_out)
sizes = [f.nbytes(n) for f in HFCheckpoint(big).files.values() for n in f.entries]
baseline = psutil.Process().memory_info().rss
reset_peak()
convert_hf_to_orbax(big, big_out)
peak = peak_rss()
print(json.dumps(dict(
    peak_over_baseline=peak - baseline, largest_tensor=max(sizes), model_bytes=sum(sizes),
    tensors=len(sizes),
)))
"""
)

MEASURE_RESTORE = (
    PEAK_RSS
    + """
import json, sys
import jax, jax.numpy as jnp, psutil
from jaxllm.orbax_checkpoint import load_orbax_state, read_config
from jaxllm.params import ModelSpec
from sharding import DEFAULT_RULES, make_mesh

assert len(jax.devices()) == 1
small, big = sys.argv[1:]
for path in (small, big):
    spec = ModelSpec(read_config(path), jnp.float32, make_mesh(), DEFAULT_RULES)
    spec.abstract()
    baseline = psutil.Process().memory_info().rss
    reset_peak()
    _, state = load_orbax_state(path, spec)
    jax.block_until_ready(jax.tree.leaves(state))
    if path == small:
        del state
peak = peak_rss()
loaded = sum(x.nbytes for x in jax.tree.leaves(state))
print(json.dumps(dict(peak_over_arrays=peak - baseline - loaded, loaded_bytes=loaded)))
"""
)


def run_python(script: str, *args) -> dict:
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]) if done.stdout.strip() else {}


def test_conversion_and_restore_hold_little_beyond_the_model(hf_dir, converted, tmp_path):
    """Conversion holds a few tensors, never the model; restore holds little beyond its
    arrays. Measured by hand on this model, Orbax's plain restore of the whole tree (one
    StandardCheckpointer checkpoint) held 48-75% of the model beyond its arrays; this restore
    10-13% (scripts/bench_checkpoint.py measures both)."""
    run_python(hf_models.WRITE_BIG_MODEL, tmp_path / "hf")
    got = run_python(
        MEASURE_CONVERT, hf_dir, tmp_path / "small", tmp_path / "hf", tmp_path / "ckpt"
    )
    mib = {k: round(v / 2**20, 1) for k, v in got.items() if k != "tensors"}
    print(f"\nhost memory while converting (MiB): {mib}, {got['tensors']} tensors")
    assert got["model_bytes"] >= 500e6 and got["tensors"] >= 90
    # A few tensors in flight, nowhere near the 512 MiB model: 31-37 MiB were measured on CI
    # runs (3.0-3.3x the 11 MiB largest tensor; the allocator's slack varies), so 3x flaked.
    assert got["peak_over_baseline"] <= 4 * got["largest_tensor"]

    restored = run_python(MEASURE_RESTORE, converted, tmp_path / "ckpt")
    over = restored["peak_over_arrays"]
    print(
        f"host memory while restoring: {over / 2**20:.1f} MiB beyond the arrays, "
        f"{over / got['model_bytes']:.1%} of the model's {got['model_bytes'] / 2**20:.0f} MiB"
    )
    assert restored["loaded_bytes"] == got["model_bytes"]
    assert over <= 0.25 * got["model_bytes"]
