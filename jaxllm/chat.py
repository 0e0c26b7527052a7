"""Chat messages -> prompt token ids, the one way every front end does it (``LLM.chat``, the
gRPC ``messages`` field, the OpenAI HTTP server).

The model's chat template renders the conversation with the generation prompt for the
assistant's turn; the text is then tokenized without special tokens, as transformers'
``apply_chat_template(tokenize=True)`` and vLLM's chat endpoint do: a template that writes
BOS (Llama 3's, Mistral's ...) gets exactly one, and one that does not gets none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jinja2

from jaxllm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def check_messages(messages: object) -> list[dict[str, str]]:
    """The messages as plain ``{"role", "content"}`` dicts, or ValueError saying what is
    wrong (and where: ``messages[2].role``)."""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role', 'content'} objects")
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        extra = set(message) - {"role", "content"}
        if extra:
            raise ValueError(f"messages[{i}] has unsupported keys {sorted(extra)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def chat_prompt_ids(tokenizer: Tokenizer, messages: object) -> list[int]:
    """Prompt ids for the assistant's next turn in ``messages`` (a list of ``{"role":
    "system" | "user" | "assistant", "content": str}``, as JSON gives it: anything else is a
    ValueError); ValueError too for a model without a chat template, or a template that
    refuses the conversation."""
    checked = check_messages(messages)
    if not tokenizer.has_chat_template:
        raise ValueError(
            "this model has no chat template (tokenizer_config.json or chat_template.jinja), "
            "so chat messages cannot be formatted; send a plain prompt instead"
        )
    try:
        text = tokenizer.apply_chat_template(checked, add_generation_prompt=True)
    except jinja2.TemplateError as e:  # e.g. raise_exception("roles must alternate")
        raise ValueError(f"the chat template refused these messages: {e}") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("the chat template rendered these messages as an empty prompt")
    return ids
