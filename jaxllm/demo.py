"""The model ``LLM.load()`` and ``jaxllm serve`` use when no model is given.

A small Llama (about 5 M parameters, 256-token context) that ``scripts/train_demo.py``
trained with optax on the CPython standard library's own ``.py`` files, with a byte-level BPE
tokenizer trained on the same files: it completes Python code. It ships inside the package as
an ordinary jaxllm Orbax checkpoint (``jaxllm/demo_model/``), so it loads through the same path
as any converted model, and ``training.json`` beside it records how it was trained and what it
scored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxllm import orbax_checkpoint

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
DEMO_MODEL_NAME = "jaxllm-demo-stdlib"


def demo_model_dir() -> Path:
    """The bundled checkpoint's folder; an error says how to get it back if it is missing."""
    if not orbax_checkpoint.is_orbax_checkpoint(DEMO_MODEL_DIR):
        raise FileNotFoundError(
            f"the bundled demo model is missing from {DEMO_MODEL_DIR} (an install without "
            "package data?); reinstall jaxllm, pass a model path, or regenerate it with "
            "`python scripts/train_demo.py`"
        )
    return DEMO_MODEL_DIR


def training_record() -> dict[str, Any]:
    """What ``scripts/train_demo.py`` recorded: corpus, steps, time, held-out perplexity, and
    the training split's token counts (``train_unigram_counts``) for unigram baselines."""
    return json.loads((demo_model_dir() / "training.json").read_text())
