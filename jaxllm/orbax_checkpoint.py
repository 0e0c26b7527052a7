"""jaxllm's own checkpoints, in Orbax: converted from Hugging Face, saved from a live state,
restored straight into the shards of any mesh.

A checkpoint is a folder::

    jaxllm_checkpoint.json   format version, dtype, every parameter's shape and dtype
    config.json              the model's Hugging Face config
    tokenizer/               tokenizer files, with a copy of config.json (its token ids)
    arrays/<name>/           one Orbax PyTree checkpoint per parameter, e.g. arrays/layers.0.attn.wq

Arrays are stored under jaxllm's parameter names and layout, so a restore is a plain read
(plus, on a mesh whose head axis does not divide the heads, the copies and zero heads of
``jaxllm.head_layout``; a checkpoint always holds the stored heads, whatever mesh saved it).
One Orbax checkpoint per parameter, because Orbax writes a tree in one call from arrays that
all exist at once (a conversion would hold the whole model) and its whole-tree restore in one
CPU process held 48-75% of a 512 MiB model beyond its arrays; one parameter at a time, host
memory stays within a few tensors both ways. A checkpoint is written into a hidden sibling
folder, ``jaxllm_checkpoint.json`` last once all else is on disk (fsync), then renamed into
place: an interrupted write leaves nothing that ``is_orbax_checkpoint`` accepts.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from jaxllm import head_layout
from jaxllm import quantize as quant
from jaxllm.config import ModelConfig
from jaxllm.hf_checkpoint import (
    CheckpointError,
    HFCheckpoint,
    SafetensorsFile,
    Stored,
    _check_names,
    hf_layout,
    view_reader,
)
from jaxllm.params import ModelSpec, NamedParam, named_params
from sharding import DEFAULT_RULES, make_mesh

FORMAT_VERSION = 2  # 2: weights [out, in], as Hugging Face stores them (1: [in, out])
METADATA_FILE = "jaxllm_checkpoint.json"
_FORMAT = "jaxllm-orbax"
_TOKENIZER_FILES = (
    "tokenizer.json tokenizer.model tokenizer_config.json generation_config.json "
    "chat_template.jinja special_tokens_map.json"
).split()
# Storage chunks of at most 1 MiB, one attention head wide, uncompressed: a restore into any
# mesh reads little beyond its own shards, and reading is a plain copy (zstd would cost a
# decode pass for the ~10% it saves on weights).
_CHUNK_BYTES = 1 << 20
_HEAD_AXES = ("q_heads", "kv_heads")
_BLOCK_BYTES = 2 << 20  # conversion copies a stored tensor this much at a time

OnTensor = Callable[[str, int], None] | None


def tokenizer_dir(path: str | Path) -> Path:
    """The folder of a checkpoint that ``Tokenizer.from_dir`` reads."""
    return Path(path) / "tokenizer"


def is_orbax_checkpoint(path: str | Path) -> bool:
    """True for a complete jaxllm Orbax checkpoint (its metadata file is written last)."""
    return (Path(path) / METADATA_FILE).is_file()


def read_metadata(path: str | Path) -> dict:
    """The checkpoint's ``jaxllm_checkpoint.json``, after checking its format version."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    file = path / METADATA_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{path} is not a jaxllm Orbax checkpoint: it has no {METADATA_FILE} (written last, "
            "so a conversion or save that did not finish leaves none)"
        )
    try:
        meta = json.loads(file.read_text())
        version, _ = meta["format_version"], meta["params"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: unreadable checkpoint metadata ({e!r})") from e
    if meta.get("format") != _FORMAT or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: checkpoint format {meta.get('format')!r} version {version!r} is not "
            f"readable by this jaxllm, which reads {_FORMAT!r} version {FORMAT_VERSION}"
        )
    return meta


def read_quantization(path: str | Path) -> str | None:
    """How the checkpoint's weights are quantized (``"int8"``), or None for float weights."""
    return read_metadata(path).get("quantization")


def read_config(path: str | Path) -> ModelConfig:
    """The model config a checkpoint was saved with."""
    read_metadata(path)
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: the checkpoint has no config.json")
    return ModelConfig.from_hf_dict(json.loads(file.read_text()))


# -- writing ----------------------------------------------------------------------------------


def convert_hf_to_orbax(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype=None,
    quantize: str | None = None,
    on_tensor: OnTensor = None,
) -> Path:
    """Converts a Hugging Face folder (one or many safetensors files) into a checkpoint at
    ``out_dir``, one tensor at a time, cast to ``dtype`` (default: the dtype most of the
    stored bytes have); ``quantize="int8"`` stores int8 weights and their scales
    (``jaxllm.quantize``) instead. ``on_tensor(name, nbytes)`` is called after each tensor
    is written."""
    quant.check_method(quantize)
    hf_dir = Path(hf_dir)
    config = ModelConfig.from_hf_dir(hf_dir)
    ckpt = HFCheckpoint(hf_dir)
    layout = hf_layout(config)
    _check_names(ckpt, layout, config)
    if dtype is None:
        by_dtype = Counter()
        for stored in (t for s in layout.values() for t in s.tensors()):
            file = ckpt.location[stored.name]
            by_dtype[file.entries[stored.name][0]] += file.nbytes(stored.name)
        dtype = by_dtype.most_common(1)[0][0]
    dtype = jnp.dtype(dtype)

    def arrays():
        for name in sorted(layout):
            stored = layout[name]
            parts = [_to_jaxllm_layout(ckpt.location[t.name], t, dtype) for t in stored.tensors()]
            yield name, np.stack(parts) if stored.experts else parts[0]

    config_text = (hf_dir / "config.json").read_text()
    return _write(
        Path(out_dir),
        config_text,
        hf_dir,
        _to_store(config, dtype, arrays(), quantize),
        on_tensor,
        host_arrays=True,
        quantization=quantize,
    )


def _to_store(config: ModelConfig, dtype, arrays, quantize: str | None):
    """``(name, array, logical axes)`` to write, from float ``(name, array)`` pairs in
    jaxllm's layout: each weight quantized plus its scale when ``quantize`` says."""
    mesh = make_mesh({"tensor": 1}, devices=jax.devices()[:1])
    _, abstract = ModelSpec(config, dtype, mesh, DEFAULT_RULES).abstract()
    axes = {k: p.axes for k, p in named_params(abstract).items()}
    for name, array in arrays:
        in_dims = quant.input_dims(name)
        if quantize is None or in_dims is None:
            yield name, array, axes[name]
            continue
        method = quant.method_for(name, quantize)
        q, scale = (np.asarray(x) for x in quant.quantize(array, in_dims, method))
        del array
        yield name, q, axes[name]
        scale_axes = axes[name] if scale.ndim == q.ndim else axes[name][: q.ndim - in_dims]
        yield quant.scale_name(name), scale, scale_axes


def convert_gguf_to_orbax(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    dtype=None,
    quantize: str | None = None,
    on_tensor: OnTensor = None,
) -> Path:
    """Converts a GGUF file into a checkpoint at ``out_dir``: its metadata as config.json,
    its vocabulary as tokenizer files (with the chat template in tokenizer_config.json), and
    its tensors dequantized one at a time and cast to ``dtype`` (default: float32 or float16
    for a file mostly of those, else bfloat16); ``quantize="int8"`` as for
    ``convert_hf_to_orbax``."""
    import tempfile

    from jaxllm.gguf_checkpoint import GGUFFile, jaxllm_arrays

    quant.check_method(quantize)
    file = GGUFFile(gguf_path)
    config = file.config()
    dtype = jnp.dtype(dtype if dtype is not None else file.stored_dtype())
    with tempfile.TemporaryDirectory() as tokenizer_src:
        file.tokenizer().save(tokenizer_src)
        config_text = json.dumps(config.to_hf_dict(), indent=2)
        return _write(
            Path(out_dir),
            config_text,
            tokenizer_src,
            _to_store(config, dtype, jaxllm_arrays(file, config, dtype), quantize),
            on_tensor,
            host_arrays=True,
            quantization=quantize,
        )


def save_state(
    state: nnx.State,
    config: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    on_tensor: OnTensor = None,
) -> Path:
    """Saves a live model state (e.g. after quantization or fine-tuning), sharded however it
    is, as a checkpoint at ``out_dir``; every process calls this, and each writes its own
    shards. ``config`` is the config the state runs with (``llm.config``): a state with
    copied or zero-padded heads (``config.head_layout``) is saved in the stored layout, so the
    checkpoint loads on any mesh. ``tokenizer_dir`` is a folder to copy the tokenizer files
    from."""
    params = named_params(state)
    layout = config.head_layout
    for name, stored in sorted(hf_layout(config).items()):
        shape = stored.ours
        found = "missing"
        if name in params:
            found = quant.float_shape(params[name].shape, params[name].value().dtype)
        if layout is not None and name in params:
            found = layout.source_shape(found, params[name].axes)
        if found != shape:
            raise ValueError(
                f"the state's {name!r} has shape {found}, the config gives {shape} (for a "
                "state whose heads were padded for its mesh, pass the config it runs with)"
            )
    # A quantized state (jaxllm.quantize) carries a scale beside every quantized weight.
    quantization = quant.method_of({n: p.value() for n, p in params.items()})

    def stored_layout(param: NamedParam) -> jax.Array:
        if layout is None or layout.maps(param.axes) is None:
            return param.value()
        return head_layout.shrink(param.value(), layout, param.axes)

    arrays = ((name, stored_layout(param), param.axes) for name, param in sorted(params.items()))
    config_text = json.dumps(config.to_hf_dict(), indent=2)
    return _write(
        Path(out_dir), config_text, tokenizer_dir, arrays, on_tensor, quantization=quantization
    )


def _write(
    out_dir: Path,
    config_text: str,
    tokenizer_src: str | Path | None,
    arrays: Iterable[tuple[str, np.ndarray | jax.Array, tuple | None]],
    on_tensor: OnTensor,
    host_arrays: bool = False,
    quantization: str | None = None,
) -> Path:
    """Writes a checkpoint into a hidden sibling of ``out_dir``, adds the metadata file once
    everything else is durable, and renames the folder into place. For numpy arrays
    (``host_arrays``), Orbax's defensive copy is skipped: nothing changes them meanwhile."""
    out_dir = out_dir.absolute()  # Orbax rejects relative paths
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    primary, many = jax.process_index() == 0, jax.process_count() > 1
    suffix = np.array(uuid.uuid4().int % 2**31, np.int32)  # keeps concurrent writers apart
    if many:  # every process must name the same folder
        suffix = multihost_utils.broadcast_one_to_all(suffix)
    folder = out_dir.parent / f".{out_dir.name}.partial-{int(suffix):08x}"
    registry = {}
    if host_arrays:
        registry["type_handler_registry"] = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, ocp.type_handlers.ArrayHandler()),
        )
    saver = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, **registry))
    params, sizes = {}, Counter()
    try:
        if primary:
            (folder / "arrays").mkdir(parents=True)
            (folder / "config.json").write_text(config_text)
            if tokenizer_src is not None:
                _copy_tokenizer(Path(tokenizer_src), folder)
        _sync("jaxllm_checkpoint_start", many)
        for name, value, logical_axes in arrays:
            heads = tuple(i for i, a in enumerate(logical_axes or ()) if a in _HEAD_AXES)
            save_args = {name: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES, shard_axes=heads)}
            args = ocp.args.PyTreeSave({name: value}, save_args=save_args)
            saver.save(folder / "arrays" / name, args=args)
            del args  # holds the array
            params[name] = {"shape": list(value.shape), "dtype": jnp.dtype(value.dtype).name}
            nbytes = value.nbytes
            sizes[params[name]["dtype"]] += nbytes
            del value
            _release_freed_memory()
            if on_tensor is not None:
                on_tensor(name, nbytes)
        _sync("jaxllm_checkpoint_written", many)
        if primary:
            _fsync(folder, recursive=True)
            meta = {"format": _FORMAT, "format_version": FORMAT_VERSION, "params": params}
            meta["dtype"] = sizes.most_common(1)[0][0]
            if quantization is not None:
                meta["quantization"] = quantization
            (folder / METADATA_FILE).write_text(json.dumps(meta, indent=1))
            _fsync(folder / METADATA_FILE)
            _fsync(folder)
            if out_dir.exists():
                out_dir.rmdir()  # empty, checked above
            folder.rename(out_dir)
            _fsync(out_dir.parent)
        _sync("jaxllm_checkpoint_done", many)
    except BaseException:
        if primary:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        saver.close()
    return out_dir


def _copy_tokenizer(src: Path, folder: Path) -> None:
    found = [name for name in _TOKENIZER_FILES if (src / name).is_file()]
    if not found:
        return
    tokenizer_dir(folder).mkdir()
    for name in found:
        shutil.copyfile(src / name, tokenizer_dir(folder) / name)
    # Tokenizer.from_dir reads bos/eos/pad token ids from config.json, as transformers does.
    shutil.copyfile(folder / "config.json", tokenizer_dir(folder) / "config.json")


def _sync(name: str, many: bool) -> None:
    if many:
        multihost_utils.sync_global_devices(name)


def _fsync(path: Path, recursive: bool = False) -> None:
    """Flushes a file or folder to disk; with ``recursive``, everything under a folder."""
    paths = [path]
    if recursive:
        paths = [Path(d) / n for d, dirs, files in os.walk(path) for n in [*dirs, *files]] + paths
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _to_jaxllm_layout(file: SafetensorsFile, stored: Stored, dtype) -> np.ndarray:
    """One stored tensor in jaxllm's layout and ``dtype``, copied a block of rows at a time
    from a slice of just that block, so that the source adds little to host memory."""
    source_dtype = file.entries[stored.name][0]
    view, perm = stored.view, stored.perm
    out = _anonymous_array(tuple(view[p] for p in perm), dtype)
    row_bytes = int(np.prod(view[1:])) * source_dtype.itemsize
    step = max(1, _BLOCK_BYTES // max(1, row_bytes))
    for start in range(0, view[0], step):
        rows = min(step, view[0] - start)
        # A mapping per block: the pages read through it leave the process with it.
        read = view_reader(file.tensor(stored.name), stored)
        block = read((slice(start, start + rows),) + (slice(None),) * (len(view) - 1))
        del read
        index = [slice(None)] * len(view)
        index[perm.index(0)] = slice(start, start + rows)  # where stored rows land
        np.copyto(out[tuple(index)], block.transpose(perm), casting="unsafe")
        del block
    return out


def _anonymous_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An array in its own mapping, returned to the OS when dropped. From malloc, tensor after
    tensor left ~50 MiB in glibc's heaps over a 512 MiB conversion (largest tensor 11 MiB)."""
    count = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(1, count * dtype.itemsize)), dtype, count).reshape(shape)


# -- reading ----------------------------------------------------------------------------------


def load_orbax_state(
    path: str | Path, spec: ModelSpec, on_tensor: OnTensor = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """Parameters of ``spec`` restored from the checkpoint at ``path`` into ``spec``'s mesh and
    shardings (any mesh, whatever the checkpoint was saved from), one parameter at a time, in
    the order ``spec.fill`` builds them; each process reads only the shards its devices hold,
    cast to ``spec.dtype``.

    ``on_tensor(name, nbytes)`` is called after each parameter is placed (progress bars).
    """
    path = Path(path).absolute()  # Orbax rejects relative paths
    meta = read_metadata(path)
    stored, stored_quantization = meta["params"], meta.get("quantization")
    targets = spec.targets()
    if stored_quantization != spec.quantized and stored_quantization is not None:
        raise CheckpointError(
            f"{path}: the checkpoint is {stored_quantization}-quantized; load it with "
            f"quantize={stored_quantization!r} (it holds no float weights)"
        )
    # Quantizing a float checkpoint at load: its weights are read as float, one at a time,
    # and quantized in their shards before the next is read.
    quantize_now = spec.quantized is not None and stored_quantization is None
    reads = dict(targets)
    if quantize_now:
        for name in [n for n in reads if quant.input_dims(n) is not None]:
            del reads[quant.scale_name(name)]
            t = reads[name]
            shape = quant.float_shape(t.shape, t.dtype)
            reads[name] = jax.ShapeDtypeStruct(shape, spec.dtype, sharding=t.sharding)
    # What the checkpoint holds: the stored head layout, expanded after reading.
    reads = {name: spec.stored_target(name, target) for name, target in reads.items()}
    missing, extra = sorted(reads.keys() - stored.keys()), sorted(stored.keys() - reads.keys())
    if missing or extra:
        raise CheckpointError(
            f"{path}: parameters do not match the model: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for name, target in reads.items():
        shape, dtype = tuple(stored[name]["shape"]), stored[name]["dtype"]
        if shape != target.shape or _kind(dtype) != _kind(target.dtype):  # float casts are fine
            raise CheckpointError(
                f"{path}: parameter {name!r} is stored as {dtype}{list(shape)}; this model "
                f"config needs {jnp.dtype(target.dtype).name}{list(target.shape)}"
            )
    loader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    quantized: dict[str, jax.Array] = {}  # the scale (or weight) that came with the other

    def make(name: str, target: jax.ShapeDtypeStruct) -> jax.Array:
        """Parameter ``name`` read straight into its shards when ``spec.fill`` asks for it
        (so a layer is written into its stacked array before the next is read)."""
        if name in quantized:
            return quantized.pop(name)
        weight = name
        if quantize_now and name.endswith(quant.SCALE_SUFFIX):
            weight = name[: -len(quant.SCALE_SUFFIX)]
        array = _restore(loader, path, weight, reads[weight])
        nbytes = array.nbytes  # as read
        maps = spec.head_maps(weight)
        if maps is not None:
            array = head_layout.expand(array, maps, targets[weight].sharding)
        if quantize_now and quant.input_dims(weight) is not None:
            quantized.update(quant.quantize_into(array, weight, targets, spec.quantized))
            del array
            array = quantized.pop(name)
        _release_freed_memory()
        if on_tensor is not None:
            on_tensor(weight, nbytes)
        return array

    try:
        return spec.fill(make)
    finally:
        loader.close()


def _restore(loader, path: Path, name: str, target: jax.ShapeDtypeStruct) -> jax.Array:
    """One parameter, read by each process for the shards its devices hold."""
    folder = path / "arrays" / name
    if not folder.is_dir():
        raise CheckpointError(f"{path}: the array data of parameter {name!r} is missing")
    # strict: a stored array of another shape is an error, never padded or truncated.
    restore_args = ocp.ArrayRestoreArgs(
        sharding=target.sharding, global_shape=target.shape, dtype=target.dtype, strict=True
    )
    args = ocp.args.PyTreeRestore(item={name: target}, restore_args={name: restore_args})
    try:
        array = loader.restore(folder, args=args)[name]
        array.block_until_ready()  # surface read errors here, for this parameter
    except Exception as e:
        raise CheckpointError(
            f"{folder}: cannot read parameter {name!r}: {_root_cause(e)} (its files are "
            "missing, truncated, corrupt or from another array)"
        ) from e
    return array


def _kind(dtype) -> str:
    """numpy's dtype kind, with the ml_dtypes floats (bfloat16, float8s) counted as floats."""
    dtype = jnp.dtype(dtype)
    return "f" if jnp.issubdtype(dtype, jnp.floating) else dtype.kind


def _root_cause(error: BaseException) -> str:
    """The innermost error's first line: TensorStore's says which file and byte range."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:300]}"


def _release_freed_memory() -> None:
    """Hands freed heap memory back to the OS (glibc only). Once a large block has been freed,
    glibc serves later blocks of up to that size (at most 32 MiB) from its heaps instead of
    fresh mappings, and keeps them when freed. Restoring a 512 MiB model kept 7-10% of it
    beyond its arrays with this, 10-12% without (and 26% before restores went largest-first)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim  # noqa: B018  (glibc has it; other C libraries may not)
except (OSError, AttributeError):
    _LIBC = None
