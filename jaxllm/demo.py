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
import random
import sys
import sysconfig
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


# Folders of the stdlib left out of the corpus: test suites (huge, repetitive fixtures),
# installed third-party packages, and generated data dressed as code: the codec tables of
# encodings/ (12% of the bytes, more of the tokens) and pydoc_data's one giant string. With
# them in, the first model answered `import ` with rows of a code page table.
EXCLUDED_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",
    "pydoc_data",
}
HELDOUT_FRACTION = 0.05


def corpus_files(
    stdlib: Path, heldout_fraction: float = HELDOUT_FRACTION, seed: int = 0
) -> tuple[list[Path], list[Path]]:
    """(train, held-out): sorted stdlib .py files outside EXCLUDED_DIRS, split by file with a
    seeded shuffle. ``scripts/train_demo.py`` trained on this split."""
    files = [
        p
        for p in sorted(stdlib.rglob("*.py"))
        if not EXCLUDED_DIRS & set(p.relative_to(stdlib).parts[:-1])
    ]
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(len(files) * heldout_fraction))
    heldout = sorted(files[i] for i in order[:n_heldout])
    train = sorted(files[i] for i in order[n_heldout:])
    return train, heldout


def heldout_files() -> list[Path]:
    """The files the bundled model never trained on, rebuilt from this interpreter's stdlib.

    Only the Python version that trained the model has the same stdlib, so the split is
    checked against ``training.json`` (version, file counts); otherwise this raises
    ``FileNotFoundError`` and callers must be given text instead."""
    record = training_record()
    version = sys.version.split()[0]
    if version != record["python"]:
        raise FileNotFoundError(
            f"the demo model's held-out files are files of the Python {record['python']} "
            f"standard library; this is Python {version}, whose stdlib differs"
        )
    seed = int(record.get("seed", 0))
    train, heldout = corpus_files(Path(sysconfig.get_paths()["stdlib"]), seed=seed)
    if (len(train), len(heldout)) != (record["train_files"], record["heldout_files"]):
        raise FileNotFoundError(
            f"this stdlib splits into {len(train)} training and {len(heldout)} held-out files, "
            f"not the {record['train_files']} and {record['heldout_files']} the demo model "
            "was trained with (a modified stdlib?)"
        )
    return heldout
