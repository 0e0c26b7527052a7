"""GGUF files (llama.cpp's single-file format): config, weights and tokenizer, read with the
format's own reader (``gguf.GGUFReader``).

The file's metadata becomes a Hugging Face style config dict, so ``ModelConfig.from_hf_dict``
checks it as it checks any config.json. Weights are read one tensor at a time: each is
dequantized on the host to float32 (``gguf.quants.dequantize``, the same code transformers
uses), put back into Hugging Face's layout where llama.cpp's converter changed it, and placed
into its shards by ``hf_checkpoint.read_into_shards``; so host memory holds one tensor beside
the model. Quantized (``quantize=``), Q8_0 and Q4_0 layer weights are kept as they are where
the method stores the same blocks (``int8-g32`` and ``int4``: ``PACKED``), values and scales
placed straight into their shards without a float copy; any other tensor is dequantized and
quantized again in its shards (``ModelSpec.fill_from_float``): a Q8_0 file loaded with
``quantize="int8"`` runs with per-channel scales, close to but not bit-identical with its
32-value blocks.

Two details of the format matter here. GGUF lists dimensions innermost first (``ne[0]`` is the
input dimension of a weight), so the reader's numpy view of a ``[out, in]`` matrix has
Hugging Face's shape already. And for the ``llama`` architecture llama.cpp's converter
interleaves the two rotary halves of every query and key head (its rope rotates adjacent
pairs; Hugging Face's rotates the first half against the second), which ``_unpermute_heads``
undoes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np
from flax import nnx

from jaxllm import quantize as quant
from jaxllm.config import ConfigError, ModelConfig
from jaxllm.hf_checkpoint import CheckpointError, Stored, hf_layout, read_into_shards
from jaxllm.params import ModelSpec
from jaxllm.tokenizer import Tokenizer

MAGIC = b"GGUF"
Q = gguf.GGMLQuantizationType
# Block types whose bytes are a jaxllm.quantize format: loaded as they are, without a float
# copy, when the model is quantized with that method.
PACKED = {Q.Q8_0: "int8-g32", Q.Q4_0: "int4"}
# Tensor types this loader dequantizes (all through gguf.quants); others are refused by name.
DEQUANTIZABLE = frozenset(
    [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
    + [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
)
_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one GGUF ``general.architecture`` maps onto a jaxllm model family.

    Tensor names come from the format's own table (``gguf.get_tensor_name_map``), applied to
    the Hugging Face names of ``hf_layout``, so a family whose parameters ``hf_layout`` knows
    (Qwen3's ``attn_q_norm``/``attn_k_norm``, Gemma 3's sandwich norms) needs only a row here.
    """

    hf_architecture: str  # ModelConfig.architecture
    # llama.cpp's converter interleaved the rope halves of Q and K rows (its "llama" rope).
    permuted_qk: bool = False
    # Added by llama.cpp's converter to every norm weight (Gemma stores weight - 1 and
    # multiplies by 1 + weight; llama.cpp multiplies by what the file holds): subtracted here.
    norm_offset: float = 0.0
    # Config keys the metadata implies for this family, beyond the common ones (Gemma 3's
    # sliding-window pattern and query scale): metadata getter -> config.json entries.
    extra_config: Callable[[Callable[..., Any]], dict[str, Any]] | None = None
    # Architecture to use when the file sets {arch}.attention.sliding_window (one window for
    # every layer); None: such a file is refused rather than served without its window.
    windowed_architecture: str | None = None


def _gemma3_config(key: Callable[..., Any]) -> dict[str, Any]:
    """Gemma 3's config entries that llama.cpp does not all write: the window is in the
    metadata, but llama.cpp hard-codes which layers use it (every sixth layer global, unless
    the file has a sliding_window_pattern), the local layers' rope base (10k) and the query
    scale (1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B model); so does
    this loader."""
    layers, head_dim = int(key("block_count")), int(key("attention.key_length"))
    pattern = key("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # one flag per layer: True where the layer is local
        local = [bool(x) for x in pattern]
    else:
        local = [bool((i + 1) % int(pattern)) for i in range(layers)]
    heads = _one_value(key("attention.head_count"), "attention.head_count")
    scalar = int(key("embedding_length")) // int(heads) if layers == 62 else head_dim
    return {
        "sliding_window": int(key("attention.sliding_window")),
        "layer_types": ["sliding_attention" if x else "full_attention" for x in local],
        "query_pre_attn_scalar": scalar,
        "rope_local_base_freq": 10_000.0,
    }


ARCHITECTURES: dict[str, Architecture] = {
    # Also what llama.cpp writes for Mistral and Llama 2/3 models.
    "llama": Architecture(
        "LlamaForCausalLM", permuted_qk=True, windowed_architecture="MistralForCausalLM"
    ),
    "qwen2": Architecture("Qwen2ForCausalLM"),
    "qwen3": Architecture("Qwen3ForCausalLM"),
    "gemma3": Architecture("Gemma3ForCausalLM", norm_offset=1.0, extra_config=_gemma3_config),
}


def is_gguf_file(path: str | Path) -> bool:
    """True for a file that starts with GGUF's magic bytes (whatever its suffix)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


class GGUFFile:
    """One GGUF file: its metadata and tensor index parsed up front, tensor data mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_gguf_file(self.path):
            raise CheckpointError(f"{self.path} is not a GGUF file (no 'GGUF' magic bytes)")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, KeyError, IndexError) as e:
            raise CheckpointError(f"{self.path}: unreadable GGUF file ({e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture: str = self.get("general.architecture")

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """Metadata value ``key`` as Python values (lists for arrays)."""
        field = self.reader.get_field(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return field.contents()

    @property
    def family(self) -> Architecture:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                f"supported: {sorted(ARCHITECTURES)}"
            )
        return ARCHITECTURES[self.architecture]

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in numpy order (outermost first: ``ne`` reversed)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))

    def config(self) -> ModelConfig:
        """The model config the metadata describes (checked like any config.json)."""
        try:
            return ModelConfig.from_hf_dict(self.hf_config())
        except ConfigError as e:
            raise ConfigError(f"{self.path}: {e}") from e

    def hf_config(self) -> dict[str, Any]:
        """The metadata as a Hugging Face config.json dict."""
        family, arch = self.family, self.architecture

        def key(name: str, default: Any = _REQUIRED) -> Any:
            return self.get(f"{arch}.{name}", default)

        heads = _one_value(key("attention.head_count"), "attention.head_count")
        kv_heads = _one_value(key("attention.head_count_kv", heads), "attention.head_count_kv")
        hidden = int(key("embedding_length"))
        head_dim = int(key("attention.key_length", hidden // heads))
        if int(key("attention.value_length", head_dim)) != head_dim:
            raise ConfigError(f"{self.path}: value heads wider than key heads are not supported")
        if int(key("rope.dimension_count", head_dim)) != head_dim:
            raise ConfigError(
                f"{self.path}: rope over {key('rope.dimension_count')} of {head_dim} head "
                "dimensions (partial rotary) is not supported"
            )
        tokens = self.get("tokenizer.ggml.tokens", None)
        vocab = key("vocab_size", len(tokens) if tokens else self.shape("token_embd.weight")[0])
        eos = [self.get(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
        raw: dict[str, Any] = {
            "architectures": [family.hf_architecture],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(key("feed_forward_length")),
            "num_hidden_layers": int(key("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(key("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(key("context_length")),
            # llama.cpp writes the output projection only when it is not the embedding.
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "bos_token_id": self.get("tokenizer.ggml.bos_token_id", None),
            "eos_token_id": list(dict.fromkeys(i for i in eos if i is not None)) or None,
        }
        if family.hf_architecture == "LlamaForCausalLM":
            raw["attention_bias"] = "blk.0.attn_q.bias" in self.tensors
        scaling = key("rope.scaling.type", "none")
        if scaling == "linear":
            raw["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
        elif scaling != "none":
            raw["rope_scaling"] = {"rope_type": scaling}  # refused by name by the config
        if "rope_freqs.weight" in self.tensors:
            freqs = self.tensors["rope_freqs.weight"]
            factors = gguf.quants.dequantize(freqs.data, freqs.tensor_type)
            raw["rope_scaling"] = _llama3_rope(factors, raw["rope_theta"], head_dim, self.path)
        extra = family.extra_config(key) if family.extra_config is not None else {}
        window = None if "sliding_window" in extra else key("attention.sliding_window", None)
        if window:
            if family.windowed_architecture is None:
                raise ConfigError(
                    f"{self.path}: {arch}.attention.sliding_window is set, and this loader does "
                    f"not know which layers of a {arch!r} model it applies to"
                )
            raw["architectures"] = [family.windowed_architecture]
            raw["sliding_window"] = int(window)
        return raw | extra

    def tokenizer(self) -> Tokenizer:
        from jaxllm.gguf_tokenizer import gguf_tokenizer

        return gguf_tokenizer(self)

    def layout(self, cfg: ModelConfig) -> dict[str, Stored]:
        """jaxllm parameter name -> how this file stores it (GGUF names, Hugging Face shapes),
        after checking that the file holds exactly these tensors, in these shapes and types."""
        names = gguf.get_tensor_name_map(_arch_enum(self.architecture), cfg.num_layers)
        layout = {}
        for ours, stored in hf_layout(cfg).items():
            name = names.get_name(stored.name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise CheckpointError(
                    f"GGUF architecture {self.architecture!r} has no tensor for {stored.name!r}"
                )
            layout[ours] = dataclasses.replace(stored, name=name)
        wanted = {s.name for s in layout.values()}
        missing = sorted(wanted - self.tensors.keys())
        if missing:
            raise CheckpointError(f"{self.path}: missing tensors {', '.join(missing[:5])}")
        extra = sorted(self.tensors.keys() - wanted - {"rope_freqs.weight"})
        if extra:
            raise CheckpointError(
                f"{self.path}: tensors {extra[:5]} are not part of a {cfg.architecture} with "
                "this metadata; refusing to serve a model that would ignore weights"
            )
        for stored in layout.values():
            tensor = self.tensors[stored.name]
            if tensor.tensor_type not in DEQUANTIZABLE:
                raise CheckpointError(
                    f"{self.path}: tensor {stored.name!r} is of type "
                    f"{Q(tensor.tensor_type).name}, which this loader cannot dequantize; "
                    f"supported: {', '.join(sorted(t.name for t in DEQUANTIZABLE))}"
                )
            if self.shape(stored.name) != stored.shape:
                raise CheckpointError(
                    f"{self.path}: tensor {stored.name!r} has shape "
                    f"{list(self.shape(stored.name))}, expected {list(stored.shape)}"
                )
        return layout

    def read(self, ours: str, stored: Stored) -> np.ndarray:
        """Tensor ``stored.name`` dequantized to float32, in Hugging Face's layout and shape."""
        tensor = self.tensors[stored.name]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(stored.shape)
        family = self.family
        if family.permuted_qk and ours.split(".")[-1] in ("wq", "wk", "bq", "bk"):
            array = _unpermute_heads(array, heads=stored.view[0])
        if family.norm_offset and ours.endswith("norm.scale"):
            array = array - np.float32(family.norm_offset)
        return array

    def packed_method(self, name: str) -> str | None:
        """The ``jaxllm.quantize`` method whose arrays tensor ``name``'s blocks are, bit for
        bit (Q8_0: int8-g32, Q4_0: int4), or None."""
        return PACKED.get(self.tensors[name].tensor_type)

    def read_packed(self, ours: str, stored: Stored) -> tuple[np.ndarray, np.ndarray]:
        """A Q8_0 or Q4_0 weight's values and scales as stored, in Hugging Face's layout: int8
        ``[O, I]`` or packed int4 ``uint8 [O, I / 2]`` (``jaxllm.quantize.pack_int4``'s layout
        is Q4_0's), and float32 scales ``[O, I / 32]``. No float copy is made."""
        tensor = self.tensors[stored.name]
        out, width = stored.shape
        blocks = np.asarray(tensor.data).reshape(out, width // 32, -1)  # [d: f16, values]
        scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
        values = np.ascontiguousarray(blocks[..., 2:])
        if tensor.tensor_type == Q.Q8_0:
            values = values.view(np.int8)
        values = values.reshape(out, -1)
        if self.family.permuted_qk and ours.split(".")[-1] in ("wq", "wk"):
            values = _unpermute_heads(values, heads=stored.view[0])
            scale = _unpermute_heads(scale, heads=stored.view[0])
        return values, scale.astype(np.float32)

    def stored_dtype(self) -> np.dtype:
        """The float dtype most of the weights' bytes come from (quantized: bfloat16)."""
        by_type: dict[Any, int] = {}
        for t in self.tensors.values():
            by_type[t.tensor_type] = by_type.get(t.tensor_type, 0) + int(t.n_bytes)
        kind = max(by_type, key=by_type.get)
        return {Q.F32: np.dtype(np.float32), Q.F16: np.dtype(np.float16)}.get(
            kind, np.dtype("bfloat16")
        )


def _one_value(value: Any, what: str) -> int:
    """A head count, which some files give per layer."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ConfigError(f"{what} differs between layers ({value}); not supported")
        value = value[0]
    return int(value)


def _arch_enum(name: str) -> gguf.MODEL_ARCH:
    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def _unpermute_heads(array: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's ``permute`` of Q/K rows: within each head, row 2i + j of the file is
    row j * H/2 + i of Hugging Face's (j: which half, i: which rotary pair)."""
    rest = array.shape[1:]
    pairs = array.reshape(heads, -1, 2, *rest)  # [heads, H/2, 2, ...]
    return np.ascontiguousarray(pairs.swapaxes(1, 2)).reshape(array.shape)


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict[str, Any]:
    """Llama 3.1's rope scaling recovered from llama.cpp's ``rope_freqs`` tensor (per rotary
    pair, the divisor of its frequency). The tensor fixes the factor and the two wavelength
    bounds, which is all the formula depends on; low_freq_factor is set to 1 and the others
    scaled to match. Checked by recomputing every divisor."""
    factors = np.asarray(factors, np.float64).reshape(-1)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(factors.max())
    middle = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    if factor <= 1 + 1e-6:
        return {"rope_type": "default"}
    if middle.sum() < 2:
        raise ConfigError(
            f"{path}: rope_freqs.weight has too few blended frequencies to recover Llama 3 "
            "rope scaling from it"
        )
    # In the blend, smooth = old_len / wavelen - low) / (high - low), a line in 1 / wavelen.
    smooth = (1 / factors[middle] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[middle], smooth, 1)
    high = 1 - 1 / intercept  # with low_freq_factor = 1: intercept = -1 / (high - 1)
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": float(round(high, 4)),
        "original_max_position_embeddings": int(round(slope * (high - 1))),
    }
    old, high = scaling["original_max_position_embeddings"], scaling["high_freq_factor"]
    blend = np.clip((old / wavelen - 1) / (high - 1), 0, 1)
    expected = 1 / ((1 - blend) / factor + blend)
    if not np.allclose(expected, factors, rtol=1e-3):
        raise ConfigError(f"{path}: rope_freqs.weight is not Llama 3 rope scaling")
    return scaling


def load_gguf_state(
    source: str | Path | GGUFFile,
    spec: ModelSpec,
    on_tensor: Callable[[str, int], None] | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """Parameters of ``spec`` read from a GGUF file (a path or an open ``GGUFFile``), one
    tensor at a time, each dequantized to float32 on the host and then placed into its shards
    in ``spec.dtype`` (or int8, for ``spec.quantized``).

    ``on_tensor(name, nbytes)`` is called after each parameter is placed (progress bars).
    """
    file = source if isinstance(source, GGUFFile) else GGUFFile(source)
    layout = file.layout(spec.config.stored)

    def read(name: str, target: jax.ShapeDtypeStruct) -> jax.Array:
        stored = layout[name]
        host = file.read(name, stored)
        array = read_into_shards(host, stored, target, spec.head_maps(name))
        array.block_until_ready()  # the host copy goes before the next tensor is read
        del host
        if on_tensor is not None:
            on_tensor(name, int(np.prod(stored.shape)) * array.dtype.itemsize)
        return array

    def read_packed(name: str, targets: dict) -> dict[str, jax.Array] | None:
        stored = layout[name]
        method = spec.quantized
        packed = file.packed_method(stored.name)
        if packed is None or quant.method_for(name, method) != method:
            return None
        if quant.scheme(packed) != quant.scheme(method) or len(stored.shape) != 2:
            return None
        if stored.perm[-1] != len(stored.view) - 1:  # the input axis must stay last
            return None
        values, scale = file.read_packed(name, stored)
        out = {}
        for key, host in ((name, values), (quant.scale_name(name), scale)):
            ratio = stored.shape[1] // host.shape[1]  # 1, 2 (int4) or 32 (scales)
            view = (*stored.view[:-1], stored.view[-1] // ratio)
            placed = dataclasses.replace(stored, shape=host.shape, view=view)
            out[key] = read_into_shards(host, placed, targets[key], spec.head_maps(key))
            out[key].block_until_ready()
        if on_tensor is not None:
            on_tensor(name, values.nbytes + scale.nbytes)
        return out

    return spec.fill_from_float(read, read_packed)


def jaxllm_arrays(file: GGUFFile, cfg: ModelConfig, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Every parameter on the host in jaxllm's layout and ``dtype``, one at a time, in name
    order: ``(name, array)`` pairs (for conversion to an Orbax checkpoint)."""
    layout = file.layout(cfg)
    for name in sorted(layout):
        stored = layout[name]
        array = file.read(name, stored).reshape(stored.view).transpose(stored.perm)
        yield name, np.ascontiguousarray(array, dtype)
