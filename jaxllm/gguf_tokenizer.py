"""The tokenizer a GGUF file describes in its metadata, as a `jaxllm.tokenizer.Tokenizer`.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`),
each token's type, and either BPE merges (`tokenizer.ggml.model` "gpt2": byte-level BPE) or
scores (`"llama"`: SentencePiece BPE), plus the special token ids and the chat template.

- "gpt2" becomes a `tokenizers` BPE with the merges, split by the pre-tokenizer regex that
  `tokenizer.ggml.pre` names (llama.cpp's own names), byte-level encoded and decoded.
- "llama" becomes a SentencePiece model proto rebuilt from pieces, scores and types (GGUF's
  token types are SentencePiece's), which the `sentencepiece` library runs exactly as the
  original tokenizer.model ran: merges by score, byte fallback, the dummy-prefix space.

Control tokens (type 3) are special: matched whole in text and dropped by
`decode(skip_special_tokens=True)`; user-defined ones (type 4, like `<think>`) are matched whole
but kept. BOS is added when `tokenizer.ggml.add_bos_token` says so (default: yes for
SentencePiece, no for byte-level BPE, as llama.cpp and transformers do).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_model
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from jaxllm.config import ConfigError
from jaxllm.tokenizer import Tokenizer

if TYPE_CHECKING:
    from jaxllm.gguf_checkpoint import GGUFFile

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_SPLIT = None  # ByteLevel's built-in GPT-2 regex
# `tokenizer.ggml.pre` (llama.cpp's names) -> how text is split before the merges run.
PRE_TOKENIZER_SPLITS: dict[str, str | None] = {
    "default": _GPT2_SPLIT,
    "gpt2": _GPT2_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "pixtral": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "gpt-4o": _GPT4O_SPLIT,
    "llama4": _GPT4O_SPLIT,
}
# llama.cpp takes a word that is one vocabulary entry whole for these, whatever the merges say.
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3", "pixtral"}
# tokenizer_config.json's names of special tokens -> their tokenizer.ggml.*_token_id keys.
_SPECIAL_IDS = {
    "bos_token": "bos",
    "eos_token": "eos",
    "unk_token": "unknown",
    "pad_token": "padding",
}
_SP_SPECIAL_IDS = {"unk_id": "unknown", "bos_id": "bos", "eos_id": "eos", "pad_id": "padding"}


def gguf_tokenizer(file: GGUFFile) -> Tokenizer:
    """The tokenizer of ``file``; its config holds the chat template and special tokens, and
    model_configs the end-of-generation ids (eos, eot, eom) the engine stops on."""
    kind = file.get("tokenizer.ggml.model", None)
    if kind is None:
        raise ConfigError(f"{file.path}: the file has no tokenizer (tokenizer.ggml.model)")
    tokens: list[str] = file.get("tokenizer.ggml.tokens")
    types: list[int] = file.get("tokenizer.ggml.token_type", None) or [NORMAL] * len(tokens)
    config: dict[str, Any] = {}
    for name, key in _SPECIAL_IDS.items():
        token_id = file.get(f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None and 0 <= token_id < len(tokens):
            config[name] = tokens[token_id]
    template = file.get("tokenizer.chat_template", None)
    if template:
        config["chat_template"] = template
    config["add_bos_token"] = bool(file.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    config["add_eos_token"] = bool(file.get("tokenizer.ggml.add_eos_token", False))
    eos = [file.get(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    model_configs = [{"eos_token_id": [i for i in eos if i is not None]}]
    if kind == "gpt2":
        pre = file.get("tokenizer.ggml.pre", "default")
        tk = _byte_level_bpe(tokens, types, file.get("tokenizer.ggml.merges"), pre, config)
        return Tokenizer.from_tokenizers(tk, config, model_configs)
    if kind == "llama":
        scores = file.get("tokenizer.ggml.scores")
        prefix = bool(file.get("tokenizer.ggml.add_space_prefix", True))
        proto = _sentencepiece_proto(tokens, scores, types, prefix, file)
        # Matched whole before SentencePiece sees the text, as transformers and llama.cpp do
        # (SentencePiece alone would give the text before them a dummy-prefix space).
        config["added_tokens_decoder"] = {
            str(i): {"content": t, "special": False}
            for i, (t, k) in enumerate(zip(tokens, types, strict=True))
            if k == USER_DEFINED
        }
        return Tokenizer.from_sentencepiece(proto, config, model_configs)
    raise ConfigError(
        f"{file.path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2', byte-level "
        "BPE, and 'llama', SentencePiece)"
    )


def _byte_level_bpe(
    tokens: list[str], types: list[int], merges: list[str], pre: str, config: dict[str, Any]
) -> tokenizers.Tokenizer:
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ConfigError(
            f"tokenizer.ggml.pre {pre!r} is not supported (its split rule is unknown here); "
            f"supported: {sorted(PRE_TOKENIZER_SPLITS)}"
        )
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES)
    tk = tokenizers.Tokenizer(bpe)
    split = PRE_TOKENIZER_SPLITS[pre]
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tk.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in typed if k == CONTROL]
    )
    tk.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in typed if k == USER_DEFINED]
    )
    # The backend's post-processor adds BOS/EOS (the Tokenizer applies add_bos_token only to
    # SentencePiece models).
    single = "$A"
    special = []
    for name, flag, where in (("bos_token", "add_bos_token", 0), ("eos_token", "add_eos_token", 1)):
        if config.get(flag) and name in config:
            token = config[name]
            single = f"{token} {single}" if where == 0 else f"{single} {token}"
            special.append((token, vocab[token]))
    if special:
        tk.post_processor = processors.TemplateProcessing(
            single=single, pair=f"{single} $B:1", special_tokens=special
        )
    return tk


def _sentencepiece_proto(
    tokens: list[str], scores: list[float], types: list[int], add_prefix: bool, file: GGUFFile
) -> bytes:
    """A SentencePiece BPE model of the file's pieces, normalized as Llama's was (identity,
    whitespace escaped to U+2581, no whitespace squeezing)."""
    proto = sp_model.ModelProto()
    for token, score, kind in zip(tokens, scores, types, strict=True):
        piece = proto.pieces.add()
        piece.piece, piece.score = token, float(score)
        piece.type = kind if NORMAL <= kind <= BYTE else NORMAL
    spec = proto.trainer_spec
    spec.model_type = sp_model.TrainerSpec.BPE
    spec.vocab_size = len(tokens)
    spec.byte_fallback = BYTE in types
    for field, key in _SP_SPECIAL_IDS.items():
        setattr(spec, field, file.get(f"tokenizer.ggml.{key}_token_id", -1))
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = add_prefix
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()
