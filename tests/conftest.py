"""Test set-up: 8 fake CPU devices, strict numerics, float32 matmuls.

XLA_FLAGS must be set before jax is imported anywhere, so this runs first.
"""

import os

# JAXLLM_TEST_REAL_DEVICES=1 (scripts/device_check.sh) runs on the machine's own devices
# (a GPU) instead; tests that need 8 devices then skip or fail there, which the script reports.
# Engines (servers spawned by tests too) compile every step shape before serving, so that
# what tests assert about batching holds from the first request; tests/test_staged_warm_up.py
# turns background compile on explicitly.
os.environ.setdefault("JAXLLM_BACKGROUND_COMPILE", "0")
if not os.environ.get("JAXLLM_TEST_REAL_DEVICES"):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

# Runtime shape checks of every jaxtyping annotation (e.g. Float[Array, "B T D"]) in the
# project's packages: a dimension that disagrees between arguments fails the call.
from jaxtyping import install_import_hook  # noqa: E402

install_import_hook(["jaxllm", "sharding", "serve"], "typecheck.typechecker")
