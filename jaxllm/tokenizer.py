"""Text <-> token ids on the host: Hugging Face tokenizer folders, chat templates, streaming.

Pure host code: no JAX here, and `transformers` is only the reference the tests compare with.
Two backends sit behind `Tokenizer`: the `tokenizers` library for `tokenizer.json` (what almost
every Hub folder ships) and `sentencepiece` for a bare `tokenizer.model` (older Llama-2 folders).
Token ids are plain Python ints; text is `str`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import sentencepiece as spm
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

_SP_SPACE = "\u2581"  # SentencePiece's visible space
_BAD_CHAR = "\ufffd"  # what a decoder writes for bytes that are not (yet) valid UTF-8
_NAMED_TOKENS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


class _HFBackend:
    """A `tokenizers.Tokenizer` from tokenizer.json; its post-processor decides BOS/EOS."""

    def __init__(self, tk: tokenizers.Tokenizer):
        self.tk = tk

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def mark_special(self, token: str) -> None:
        # transformers registers every named special token as a special added token (creating it
        # if the vocab lacks it), which is what makes decode(skip_special_tokens=True) drop it.
        if token not in {t.content for t in self.tk.get_added_tokens_decoder().values()}:
            self.tk.add_special_tokens([AddedToken(token, special=True, normalized=False)])

    def save(self, folder: Path) -> None:
        self.tk.save(str(folder / "tokenizer.json"))


class _SentencePiece:
    """A bare tokenizer.model, read the way transformers 5 reads a Llama-2 folder.

    Text is first split on added and control tokens (so "<s>" written by a chat template becomes
    BOS), and only text at the very start gets SentencePiece's dummy-prefix space, as transformers'
    converted tokenizer (Metaspace with prepend_scheme="first") does. Where transformers 5 departs
    from sentencepiece itself we follow sentencepiece: text that starts with a space keeps its
    dummy prefix (transformers drops it, so it cannot round-trip a leading space), and invalid
    UTF-8 from byte-fallback pieces gives one U+FFFD per bad sequence, as Python's
    errors="replace" does, where transformers writes one per byte of the whole byte run.
    """

    def __init__(self, model: bytes, config: dict[str, Any]):
        self.model = model
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.added: dict[str, int] = {}
        self.special: set[int] = set()
        for i in range(self.sp.get_piece_size()):
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                self.added[self.sp.id_to_piece(i)] = i
                self.special.add(i)
        for i, tok in config.get("added_tokens_decoder", {}).items():
            self.added[tok["content"]] = int(i)
            if tok.get("special", True):
                self.special.add(int(i))
        self.by_id = {i: t for t, i in self.added.items()}
        # Longest first, so that at one position "<|eot|>" wins over a shorter token inside it.
        names = sorted(self.added, key=len, reverse=True)
        self.split = re.compile("|".join(map(re.escape, names))) if names else None
        self.dummy_prefix = self.sp.encode("a", out_type=str)[0].startswith(_SP_SPACE)
        self.unk_piece = self.sp.id_to_piece(self.sp.unk_id())
        self.unk_len = len(self.sp.encode(self.unk_piece))

    def _encode_plain(self, text: str, at_start: bool) -> list[int]:
        if not text:
            return []
        if at_start or not self.dummy_prefix:
            return self.sp.encode(text)
        # sentencepiece cannot switch its dummy prefix off per call; transformers' trick: encode
        # behind "<unk>" (which merges with nothing) and drop the pieces that spell "<unk>".
        return self.sp.encode(self.unk_piece + text)[self.unk_len :]

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in self.split.finditer(text) if self.split else ():
            ids += self._encode_plain(text[pos : m.start()], at_start=pos == 0)
            ids.append(self.added[m.group()])
            pos = m.end()
        return ids + self._encode_plain(text[pos:], at_start=pos == 0)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run = bytearray()  # consecutive byte-fallback pieces, decoded together
        for i in ids:
            if skip_special_tokens and i in self.special:
                continue
            if i in self.by_id:
                piece = self.by_id[i]
            elif 0 <= i < self.sp.get_piece_size():
                if self.sp.is_byte(i):
                    run.append(int(self.sp.id_to_piece(i)[3:5], 16))  # "<0xE4>"
                    continue
                piece = self.sp.id_to_piece(i)
            else:
                continue  # like `tokenizers`, ids outside the vocab decode to nothing
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            parts.append(piece.replace(_SP_SPACE, " "))
        text = "".join(parts) + run.decode("utf-8", errors="replace")
        return text[1:] if self.dummy_prefix and text.startswith(" ") else text

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() else i

    def vocab_size(self) -> int:
        return max([self.sp.get_piece_size(), *(i + 1 for i in self.by_id)])

    def save(self, folder: Path) -> None:
        (folder / "tokenizer.model").write_bytes(self.model)


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _as_list(value: Any) -> list[int]:
    """A config's token id entry, which may be missing, an int or a list of ints."""
    return (
        [] if value is None else [int(v) for v in (value if isinstance(value, list) else [value])]
    )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class Tokenizer:
    """Encode, decode and chat-format text for one model; build with `from_dir`."""

    def __init__(
        self,
        backend: _HFBackend | _SentencePiece,
        config: dict[str, Any] | None = None,
        model_configs: Sequence[dict[str, Any]] = (),
    ):
        """`config` is tokenizer_config.json; `model_configs` are generation_config.json and
        config.json, in that order, read only for their bos/eos/pad token ids."""
        self._backend = backend
        self._config = dict(config or {})
        self.special_tokens = {
            k: t
            for k in (f"{n}_token" for n in _NAMED_TOKENS)
            if (t := _token_str(self._config.get(k))) is not None
        }
        if isinstance(backend, _HFBackend):
            for token in self.special_tokens.values():
                backend.mark_special(token)
        # With a tokenizer.json, transformers ignores add_bos_token/add_eos_token and leaves BOS
        # and EOS to the file's post-processor; only the sentencepiece path applies them.
        sp = isinstance(backend, _SentencePiece)
        self._add_bos = sp and bool(self._config.get("add_bos_token", False))
        self._add_eos = sp and bool(self._config.get("add_eos_token", False))

        def named_id(name: str) -> int | None:
            token = self.special_tokens.get(name)
            return None if token is None else backend.token_to_id(token)

        def config_ids(key: str) -> list[int]:
            return [i for c in model_configs for i in _as_list(c.get(key))]

        self.bos_id: int | None = named_id("bos_token")
        self.pad_id: int | None = named_id("pad_token")
        if self.bos_id is None and config_ids("bos_token_id"):
            self.bos_id = config_ids("bos_token_id")[0]
        if self.pad_id is None and config_ids("pad_token_id"):
            self.pad_id = config_ids("pad_token_id")[0]
        self._eos_id = named_id("eos_token")
        self.eos_ids: frozenset[int] = frozenset(
            ([] if self._eos_id is None else [self._eos_id]) + config_ids("eos_token_id")
        )
        self._template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face tokenizer folder (tokenizer.json, else tokenizer.model)."""
        folder = Path(path)
        config = _read_json(folder / "tokenizer_config.json")
        # transformers 5 saves the template to its own file, which wins over the config entry.
        if (folder / "chat_template.jinja").is_file():
            config["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if (folder / "tokenizer.json").is_file():
            backend = _HFBackend(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))
        elif (folder / "tokenizer.model").is_file():
            backend = _SentencePiece((folder / "tokenizer.model").read_bytes(), config)
        else:
            raise FileNotFoundError(
                f"no tokenizer in {folder}: looked for tokenizer.json and tokenizer.model"
            )
        model_configs = [_read_json(folder / n) for n in ("generation_config.json", "config.json")]
        return cls(backend, config, model_configs)

    @classmethod
    def from_tokenizers(
        cls,
        tk: tokenizers.Tokenizer,
        config: dict[str, Any],
        model_configs: Sequence[dict[str, Any]] = (),
    ) -> Tokenizer:
        """A `tokenizers.Tokenizer` built in memory (a GGUF file's vocabulary); `config` and
        `model_configs` as for the constructor. Saves as tokenizer.json."""
        return cls(_HFBackend(tk), config, model_configs)

    @classmethod
    def from_sentencepiece(
        cls, model: bytes, config: dict[str, Any], model_configs: Sequence[dict[str, Any]] = ()
    ) -> Tokenizer:
        """A serialized SentencePiece model (the bytes of a tokenizer.model)."""
        return cls(_SentencePiece(model, config), config, model_configs)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens)
        if add_special_tokens and self._add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_special_tokens and self._add_eos and self._eos_id is not None:
            ids = [*ids, self._eos_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._config.get("chat_template"))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render the chat template to a prompt string; `kwargs` reach the template (e.g. tools)."""
        if self._template is None:
            self._template = _compile_template(self._chat_template_source())
        # As transformers does: an OpenAI-style content=None would otherwise render as "None".
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        context.update(messages=messages, add_generation_prompt=add_generation_prompt)
        return self._template.render(**context)

    def _chat_template_source(self) -> str:
        template = self._config.get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}
        if isinstance(template, dict):
            if "default" not in template:
                raise ValueError(f"chat templates {sorted(template)} but none named 'default'")
            template = template["default"]
        if not template:
            raise ValueError(
                "this tokenizer has no chat_template (in tokenizer_config.json or "
                "chat_template.jinja), so it cannot format chat messages"
            )
        return template

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write tokenizer files and tokenizer_config.json so `from_dir(path)` reads them back."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(folder)
        config = dict(self._config)
        if isinstance(self._backend, _HFBackend):
            config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        text = json.dumps(config, indent=2, ensure_ascii=False)
        (folder / "tokenizer_config.json").write_text(text + "\n", encoding="utf-8")


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (assistant masks), rendering its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    """Compile a Hub chat template in the same sandboxed environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    # Jinja's own tojson escapes HTML characters, which would change the prompt text.
    env.filters["tojson"] = functools.partial(json.dumps, ensure_ascii=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces, one `add` per generated token.

    Each step decodes only a short window (the last emitted chunk plus the tokens not yet
    emitted) and returns the text past the chunk, as vLLM does, so a token costs O(1) and
    SentencePiece's leading space comes out right. While the window ends in U+FFFD (half a UTF-8
    character) nothing is emitted. Concatenating every piece and `flush()` equals
    `tokenizer.decode(generated_ids)`, with one exception: a ByteFallback decoder (Llama-2-style
    tokenizer.json) turns a whole run of byte pieces into U+FFFD once any byte in it is invalid,
    so text already streamed from such a run can differ from the final decode of garbage bytes.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = [int(i) for i in prompt_ids]
        self._read = len(self._ids)  # tokens before this are emitted (or are the prompt)
        # A few prompt tokens of context give the first piece its leading space; step further
        # back while the window would start inside a character.
        start, stop = max(self._read - 5, 0), max(self._read - 12, 0)
        while start > stop and self._decode(start, self._read).startswith(_BAD_CHAR):
            start -= 1
        self._prefix = start  # the window starts here
        self._prefix_text: str | None = None  # decode of [_prefix, _read), cached

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tok.decode(self._ids[start:stop], skip_special_tokens=self._skip)

    def _new_text(self) -> str:
        """Text of the unemitted tokens, as it reads after the emitted chunk before them."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        return text[len(self._prefix_text) :] if len(text) > len(self._prefix_text) else ""

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        piece = self._new_text()
        return "" if piece.endswith(_BAD_CHAR) else self._advance(piece)

    def flush(self) -> str:
        """End of stream: return what was held back (a cut-off character shows as U+FFFD)."""
        return self._advance(self._new_text())

    def _advance(self, piece: str) -> str:
        if piece:  # the emitted chunk becomes the next window's context
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = None
        return piece


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in character for each byte 0..255, as `ByteLevel` uses."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, shifted = [], 0
    for b in range(256):
        symbols.append(chr(b) if b in printable else chr(256 + shifted))
        shifted += b not in printable
    return symbols


def byte_level_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE: ids 0..255 are bytes, 256 BOS, 257 EOS; encode adds BOS."""
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    vocab = {s: b for b, s in enumerate(_byte_symbols())}
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (bos, eos)])
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, 256)]
    )
    return Tokenizer(_HFBackend(tk), {"bos_token": bos, "eos_token": eos})
