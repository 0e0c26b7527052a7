"""The model ``LLM.load()`` serves when no path is given.

Until the project ships its trained demo model, this is a small randomly initialised Llama
with a byte-level tokenizer: it exercises the whole runtime, but its output is noise, and
loading it says so.
"""

from __future__ import annotations

import logging

from jaxllm.config import ModelConfig
from jaxllm.tokenizer import Tokenizer, byte_level_tokenizer

log = logging.getLogger(__name__)

RANDOM_DEMO_CONFIG = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=258,  # 256 bytes + BOS + EOS: every id the model can emit decodes
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    rope_theta=10000.0,
    max_position_embeddings=2048,
    bos_token_id=256,
    eos_token_ids=(257,),
)

RANDOM_DEMO_NOTICE = (
    "jaxllm: no model given and no trained demo model is bundled yet; serving a small "
    "RANDOM Llama (4 layers, byte-level tokenizer) whose output is noise"
)


def random_demo() -> tuple[ModelConfig, Tokenizer]:
    log.warning(RANDOM_DEMO_NOTICE)
    return RANDOM_DEMO_CONFIG, byte_level_tokenizer()
