"""Structured output: what a request's text must match, and the grammar engine that says
which tokens may come next.

(Interface first; the grammar engine behind it is filled in by the structured-output work.)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """Exactly one constraint on a request's output (OpenAI ``response_format`` and vLLM's
    guided decoding options map onto these)."""

    json_schema: str | None = None  # JSON text of a JSON Schema
    json_object: bool = False  # any JSON object (``response_format: json_object``)
    regex: str | None = None
    grammar: str | None = None  # a Lark grammar (llguidance's dialect)

    def __post_init__(self):
        given = [self.json_schema is not None, self.json_object, self.regex is not None,
                 self.grammar is not None]
        if sum(given) != 1:
            raise ValueError(
                "structured output takes exactly one of json_schema, json_object, regex, grammar"
            )
