"""jaxllm: serve Llama-family language models with JAX, sharded over any device mesh.

import jaxllm
llm = jaxllm.LLM.load("path/to/hf_model", mesh={"tensor": 8})
print(llm.generate("def fibonacci(n):", max_tokens=32, temperature=0).text)
"""

from jaxllm.config import ConfigError, ModelConfig
from jaxllm.engine_config import EngineConfig
from jaxllm.hf_checkpoint import CheckpointError
from jaxllm.llm import LLM, Completion
from jaxllm.request_output import TokenLogprob
from jaxllm.sampling import SamplingParams
from jaxllm.structured import StructuredOutput
from jaxllm.tokenizer import Tokenizer

__all__ = [
    "LLM",
    "CheckpointError",
    "Completion",
    "ConfigError",
    "EngineConfig",
    "ModelConfig",
    "SamplingParams",
    "StructuredOutput",
    "TokenLogprob",
    "Tokenizer",
]
