"""Hugging Face safetensors checkpoints: read tensor by tensor into sharded arrays, and write.

Reading never materialises the model on the host. Files are opened with the format's own
reader (``safetensors.safe_open``, numpy, bfloat16 through ml_dtypes), which validates the
header and maps the data; each device's shard is read as a slice of its tensor (only the rows
it covers), converted, reshaped into jaxllm's layout (the same [out, in] order, heads split
out; heads copied or zero-padded where the mesh needs it, see ``jaxllm.head_layout``) and
placed on its device, one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from jaxllm import head_layout
from jaxllm.config import ModelConfig
from jaxllm.params import ModelSpec, named_params

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be served as it is; the message names file and tensor."""


class SafetensorsFile:
    """One .safetensors file through ``safe_open``: names, dtypes and shapes up front (the
    reader checks the header against the file's size), data read slice by slice."""

    def __init__(self, path: Path):
        self.path = path
        try:
            file = safe_open(str(path), framework="numpy")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{path}: not a readable safetensors file: it is truncated or damaged ({e})"
            ) from e
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        for name in file.keys():  # a safe_open handle is not iterable
            tensor = file.get_slice(name)
            if tensor.get_dtype() not in _DTYPES:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has unsupported dtype {tensor.get_dtype()}"
                )
            self.entries[name] = (np.dtype(_DTYPES[tensor.get_dtype()]), tuple(tensor.get_shape()))

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def nbytes(self, name: str) -> int:
        dtype, shape = self.entries[name]
        return math.prod(shape) * dtype.itemsize

    def tensor(self, name: str):
        """Tensor ``name``, read only where it is sliced (``tensor[a:b, c:d]`` -> ndarray).
        Each call maps the file afresh and the mapping goes when the slice is dropped: pages
        read through a mapping that stays open would count in the process's memory until
        the load ends (measured: twice the model's bytes for a 512 MiB model)."""
        return safe_open(str(self.path), framework="numpy").get_slice(name)


class HFCheckpoint:
    """The tensors of a Hugging Face model folder, by name, across one or many files."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(
                    f"no *.safetensors files in {self.path} (PyTorch .bin checkpoints are not "
                    "supported; convert them with transformers' save_pretrained)"
                )
            weight_map = None
        self.files: dict[str, SafetensorsFile] = {}
        for name in files:
            if not (self.path / name).is_file():
                raise CheckpointError(f"{index} names {name}, which does not exist")
            self.files[name] = SafetensorsFile(self.path / name)
        self.location: dict[str, SafetensorsFile] = {}
        for file in self.files.values():
            for tensor in file.entries:
                if tensor in self.location:
                    raise CheckpointError(
                        f"tensor {tensor!r} is stored in both {self.location[tensor].path.name} "
                        f"and {file.path.name}; remove the stale file"
                    )
                self.location[tensor] = file
        if weight_map is not None:
            for tensor, name in weight_map.items():
                if tensor not in self.files[name].entries:
                    raise CheckpointError(f"{index} puts {tensor!r} in {name}, which lacks it")

    def names(self) -> set[str]:
        return set(self.location)


@dataclasses.dataclass(frozen=True)
class Stored:
    """How Hugging Face stores one jaxllm parameter: under ``name`` with ``shape``; viewed as
    ``view`` and transposed by ``perm`` it becomes jaxllm's layout.

    ``experts`` > 0: the parameter stacks that many experts' matrices on a leading axis, each
    stored on its own under ``name`` with ``{e}`` replaced by the expert's index (Mixtral's
    ``...experts.{e}.w1.weight``); ``shape``, ``view`` and ``perm`` are one expert's."""

    name: str
    shape: tuple[int, ...]
    view: tuple[int, ...]
    perm: tuple[int, ...]
    experts: int = 0

    @property
    def ours(self) -> tuple[int, ...]:
        """The jaxllm parameter's shape."""
        one = tuple(self.view[p] for p in self.perm)
        return (self.experts, *one) if self.experts else one

    def tensors(self) -> list[Stored]:
        """The stored tensors this parameter is made of: itself, or one per expert."""
        if not self.experts:
            return [self]
        return [
            dataclasses.replace(self, name=self.name.format(e=e), experts=0)
            for e in range(self.experts)
        ]


def hf_layout(cfg: ModelConfig) -> dict[str, Stored]:
    """jaxllm parameter name -> how Hugging Face stores it, for every parameter of ``cfg``
    (in the stored head layout: ``cfg.stored``)."""
    cfg = cfg.stored
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def plain(name, *shape):
        return Stored(name, shape, shape, tuple(range(len(shape))))

    table = {
        "embed": plain("model.embed_tokens.weight", V, D),
        "final_norm.scale": plain("model.norm.weight", D),
    }
    if not cfg.tie_word_embeddings:
        table["lm_head"] = plain("lm_head.weight", V, D)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = hf + "self_attn."
        if cfg.sandwich_norms:  # Gemma 3 names four norms; the second follows attention
            table |= {
                ours + "attn_post_norm.scale": plain(hf + "post_attention_layernorm.weight", D),
                ours + "mlp_norm.scale": plain(hf + "pre_feedforward_layernorm.weight", D),
                ours + "mlp_post_norm.scale": plain(hf + "post_feedforward_layernorm.weight", D),
            }
        else:
            table[ours + "mlp_norm.scale"] = plain(hf + "post_attention_layernorm.weight", D)
        if cfg.qk_norm:
            table |= {
                ours + "attn.q_norm.scale": plain(attn + "q_norm.weight", H),
                ours + "attn.k_norm.scale": plain(attn + "k_norm.weight", H),
            }
        if cfg.num_experts:
            table |= _expert_layout(cfg, hf, ours)
        else:
            table |= {
                ours + "mlp.w_gate": plain(hf + "mlp.gate_proj.weight", F, D),
                ours + "mlp.w_up": plain(hf + "mlp.up_proj.weight", F, D),
                ours + "mlp.w_down": plain(hf + "mlp.down_proj.weight", D, F),
            }
        table |= {
            ours + "attn_norm.scale": plain(hf + "input_layernorm.weight", D),
            # Same [out, in] order as jaxllm: only the head dims are split out of the rows.
            ours + "attn.wq": Stored(attn + "q_proj.weight", (N * H, D), (N, H, D), (0, 1, 2)),
            ours + "attn.wk": Stored(attn + "k_proj.weight", (K * H, D), (K, H, D), (0, 1, 2)),
            ours + "attn.wv": Stored(attn + "v_proj.weight", (K * H, D), (K, H, D), (0, 1, 2)),
            ours + "attn.wo": Stored(attn + "o_proj.weight", (D, N * H), (D, N, H), (0, 1, 2)),
        }
        if cfg.qkv_bias:
            table |= {
                ours + "attn.bq": Stored(attn + "q_proj.bias", (N * H,), (N, H), (0, 1)),
                ours + "attn.bk": Stored(attn + "k_proj.bias", (K * H,), (K, H), (0, 1)),
                ours + "attn.bv": Stored(attn + "v_proj.bias", (K * H,), (K, H), (0, 1)),
            }
        if cfg.o_bias:
            table[ours + "attn.bo"] = plain(attn + "o_proj.bias", D)
    return table


def _expert_layout(cfg: ModelConfig, hf: str, ours: str) -> dict[str, Stored]:
    """A Mixture-of-Experts layer's router and experts, as Mixtral and Qwen3-MoE store them."""
    D, E, F = cfg.hidden_size, cfg.num_experts, cfg.expert_intermediate_size
    if cfg.architecture == "MixtralForCausalLM":
        moe, gate, up, down = hf + "block_sparse_moe.", "w1", "w3", "w2"
    else:
        moe, gate, up, down = hf + "mlp.", "gate_proj", "up_proj", "down_proj"

    def experts(name: str, *shape: int) -> Stored:
        return Stored(f"{moe}experts.{{e}}.{name}.weight", shape, shape, (0, 1), experts=E)

    return {
        ours + "moe.router": Stored(moe + "gate.weight", (E, D), (E, D), (0, 1)),
        ours + "moe.w_gate": experts(gate, F, D),
        ours + "moe.w_up": experts(up, F, D),
        ours + "moe.w_down": experts(down, D, F),
    }


# Stored by some exporters but carrying nothing the model needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _check_names(ckpt: HFCheckpoint, layout: dict[str, Stored], cfg: ModelConfig) -> None:
    tensors = [t for stored in layout.values() for t in stored.tensors()]
    wanted = {stored.name for stored in tensors}
    missing = sorted(wanted - ckpt.names())
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{ckpt.path}: missing tensors {', '.join(missing[:5])}{more}")
    extra = {n for n in ckpt.names() - wanted if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        extra.discard("lm_head.weight")  # a tied copy some exporters write anyway
    if extra:
        raise CheckpointError(
            f"{ckpt.path}: tensors {sorted(extra)[:5]} are not part of a {cfg.architecture} "
            "with this config.json; refusing to serve a model that would ignore weights"
        )
    for stored in tensors:
        found = ckpt.location[stored.name].shape(stored.name)
        if found != stored.shape:
            raise CheckpointError(
                f"{ckpt.path}: tensor {stored.name!r} has shape {list(found)}, expected "
                f"{list(stored.shape)} for this config.json"
            )


def view_reader(source, stored: Stored) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """``read(view_index)``: a block of ``source`` (a host array, or a safetensors slice that
    reads only what it is sliced to) seen as ``stored.view``. The view splits stored
    dimensions (``[N * H, D]`` as ``[N, H, D]``); a block's range on the first view dimension
    of each split is read whole over the rest of that split, then cut."""
    if isinstance(source, np.ndarray):
        view = source.reshape(stored.view)
        return lambda index: view[index]
    groups, at = [], 0  # per stored dimension: the view dimensions it splits into
    for size in stored.shape:
        first = at
        while math.prod(stored.view[first : at + 1]) < size:
            at += 1
        groups.append(range(first, at + 1))
        at += 1

    def read(index: tuple[slice, ...]) -> np.ndarray:
        outer, shape, inner = [], [], []
        for group in groups:
            start, stop, _ = index[group[0]].indices(stored.view[group[0]])
            rest = stored.view[group[0] + 1 : group[-1] + 1]
            outer.append(slice(start * math.prod(rest), stop * math.prod(rest)))
            shape += [stop - start, *rest]
            inner += [slice(None), *(index[d] for d in group[1:])]
        return np.asarray(source[tuple(outer)]).reshape(shape)[tuple(inner)]

    return read


def read_into_shards(
    mapped,
    stored: Stored,
    target: jax.ShapeDtypeStruct,
    heads: head_layout.Maps | None = None,
):
    """Builds one sharded array; each device's block is read from ``mapped`` (a host array
    or ``SafetensorsFile.tensor``), so only the bytes that device needs are read and
    converted. ``heads``: the runtime head layout's maps of the target's dimensions
    (``ModelSpec.head_maps``), None if unchanged."""
    view = view_reader(mapped, stored)

    def stored_block(index: tuple[slice, ...]) -> np.ndarray:
        view_index = [slice(None)] * len(stored.view)
        for ours, theirs in enumerate(stored.perm):
            view_index[theirs] = index[ours]
        return view(tuple(view_index)).transpose(stored.perm)

    def block(index: tuple[slice, ...]) -> np.ndarray:
        return np.ascontiguousarray(
            head_layout.read_block(stored_block, index, heads), target.dtype
        )

    return jax.make_array_from_callback(target.shape, target.sharding, block)


def read_experts_into_shards(
    mapped: list, stored: Stored, target: jax.ShapeDtypeStruct
) -> jax.Array:
    """``read_into_shards`` for a parameter stacked over experts: each device's block stacks
    the experts it holds, each sliced from that expert's mapped tensor."""
    views = [view_reader(m, stored) for m in mapped]

    def block(index: tuple[slice, ...]) -> np.ndarray:
        view_index = [slice(None)] * len(stored.view)
        for ours, theirs in enumerate(stored.perm):
            view_index[theirs] = index[1 + ours]
        experts = range(stored.experts)[index[0]]
        parts = [views[e](tuple(view_index)).transpose(stored.perm) for e in experts]
        return np.ascontiguousarray(np.stack(parts), target.dtype)

    return jax.make_array_from_callback(target.shape, target.sharding, block)


def load_hf_state(
    path: str | Path, spec: ModelSpec, on_tensor: Callable[[str, int], None] | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """Parameters of ``spec`` read from the safetensors in ``path``, one tensor at a time.

    ``on_tensor(name, nbytes)`` is called after each parameter is placed (progress bars).
    """
    ckpt = HFCheckpoint(path)
    layout = hf_layout(spec.config)
    _check_names(ckpt, layout, spec.config)

    def read(name: str, target: jax.ShapeDtypeStruct) -> jax.Array:
        stored = layout[name]
        if stored.experts:  # one tensor per expert, stacked on the leading axis
            mapped = [ckpt.location[t.name].tensor(t.name) for t in stored.tensors()]
            array = read_experts_into_shards(mapped, stored, target)
        else:
            mapped = ckpt.location[stored.name].tensor(stored.name)
            array = read_into_shards(mapped, stored, target, spec.head_maps(name))
        # Wait for the transfers: device_put is asynchronous and would otherwise keep the
        # host blocks of several tensors alive when the device falls behind (seen under load).
        array.block_until_ready()
        del mapped  # unmap before the next parameter: only its tensors are ever mapped
        if on_tensor is not None:  # bytes as stored, without copied or zero heads
            on_tensor(name, int(np.prod(stored.ours)) * array.dtype.itemsize)
        return array

    return spec.fill_from_float(read)


def save_hf_checkpoint(state: nnx.State, cfg: ModelConfig, path: str | Path) -> None:
    """Writes ``state`` as ``model.safetensors`` + ``config.json`` in Hugging Face layout.

    Gathers the whole model on the host: meant for small models (tests, the demo model).
    A runtime state with copied or zero-padded heads (``cfg.head_layout``) is written in the
    stored layout.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = named_params(state)
    tensors = {}
    for ours, stored in hf_layout(cfg).items():
        value = np.asarray(jax.device_get(params[ours].value()))
        if cfg.head_layout is not None:
            value = head_layout.shrink_host(value, cfg.head_layout, params[ours].axes)
        parts = value if stored.experts else [value]
        for tensor, part in zip(stored.tensors(), parts, strict=True):
            part = part.transpose(np.argsort(stored.perm)).reshape(stored.shape)
            tensors[tensor.name] = np.ascontiguousarray(part)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
