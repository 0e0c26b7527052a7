"""jaxllm's own CPU kernels (``jaxllm/kernels``): built on first use, registered with XLA's
FFI, and used by ``jaxllm.quantize`` for matmuls of few rows.

Why kernels: XLA:CPU multiplies by an int8 weight through its vector-matrix loop at about
10 G weights/s on this machine and by a packed int4 one at a third of that, slower than
reading the float32 weight; ``qmatmul.cc`` multiplies in integers and reads each weight byte
once for all rows. And XLA:CPU copies a scanned layer's weight out of its stacked array
before every matmul; both kernels read a layer of a stacked weight in place
(``fmatmul.cc`` for float32).

Built with the machine's C++ compiler (``$CXX``, else ``c++``) against the FFI headers that
ship with jaxlib, with ``-march=native``, into a per-user folder (``~/.cache/jaxllm/kernels``,
or ``$JAXLLM_KERNEL_CACHE``) keyed by the source, the compiler and jax's version, so a
second process loads it in milliseconds. Without a compiler, on a CPU without AVX2/FMA, or
with ``JAXLLM_CPU_KERNELS=0``, ``available()`` is False and quantized matmuls use XLA's own
code (same results up to the activations' int8 rounding, slower).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

log = logging.getLogger(__name__)

FOLDER = Path(__file__).with_name("kernels")
SOURCES = [FOLDER / "qmatmul.cc", FOLDER / "fmatmul.cc"]  # one library, both targets
HEADERS = [FOLDER / "common.h"]
TARGETS = {"jaxllm_qmatmul": "JaxllmQMatmul", "jaxllm_fmatmul": "JaxllmFMatmul"}
BLOCK = 32  # activation block and packing block of the kernel


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cache_dir() -> Path:
    folder = os.environ.get("JAXLLM_KERNEL_CACHE")
    return Path(folder) if folder else Path.home() / ".cache" / "jaxllm" / "kernels"


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    code = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(code + version.encode() + jax.__version__.encode()).hexdigest()[:16]
    out = _cache_dir() / f"kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed, so concurrent processes never load half a file.
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
    command += ["-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", str(partial)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


_switched_off = 0  # how many switched_off blocks are open (any thread)
_switch_lock = threading.Lock()


@contextlib.contextmanager
def switched_off():
    """Programs traced while this block is open, by any thread (an engine compiles on its
    own), use XLA's own code instead of the kernel: to measure one against the other. The
    choice is made when a program is traced."""
    global _switched_off
    with _switch_lock:
        _switched_off += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switched_off -= 1


def available() -> bool:
    """Whether the kernel may run in the program being traced: built and registered (once
    per process; False, with the reason logged, where it cannot be) and not switched off."""
    return not _switched_off and registered()


@functools.cache
def registered() -> bool:
    """Whether the kernels are built and registered in this process (once; False, with the
    reason logged, where they cannot be), switched off or not."""
    if os.environ.get("JAXLLM_CPU_KERNELS", "1") == "0":
        return False
    if not {"avx2", "fma"} <= _cpu_flags():
        log.info("CPU kernels off: this CPU lacks AVX2/FMA")
        return False
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        log.warning("CPU kernels off: no C++ compiler (set $CXX); quantized matmuls use XLA")
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("CPU kernels off: building them failed: %s", detail[-2000:])
        return False
    for target, symbol in TARGETS.items():
        handler = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(target, handler, platform="cpu")
    return True


def _require() -> None:
    if not registered():
        raise RuntimeError("jaxllm's CPU kernels are not available here (see the log)")


def _layer(layer: Array | int | None) -> Array:
    return jnp.asarray(0 if layer is None else layer, jnp.int32)


def matmul(
    x: Float[Array, "R I"], w: Float[Array, "*L O I"], layer: Array | int | None = None
) -> Float[Array, "R O"]:
    """``x @ w.T`` in float32 by the kernel; ``w`` may be a stack of layers ``[L, O, I]``,
    of which layer ``layer`` (a traced index; clamped to the stack) is read in place.
    Differentiable (training a scanned model on one CPU device): the gradients are XLA's."""
    _require()
    return _float_product(x.astype(jnp.float32), w.astype(jnp.float32), _layer(layer))


@jax.custom_vjp
def _float_product(x, w, layer):
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[-2]), jnp.float32)
    return jax.ffi.ffi_call("jaxllm_fmatmul", out)(x, w, layer)


def _float_product_forward(x, w, layer):
    return _float_product(x, w, layer), (x, w, layer)


def _float_product_backward(saved, grad):
    x, w, layer = saved
    if w.ndim == 2:
        return grad @ w, grad.T @ x, None
    at = jnp.clip(layer, 0, w.shape[0] - 1)  # the layer the kernel read
    w_grad = jax.lax.dynamic_update_index_in_dim(jnp.zeros_like(w), grad.T @ x, at, 0)
    return grad @ w[at], w_grad, None


_float_product.defvjp(_float_product_forward, _float_product_backward)


def qmatmul(
    x: Float[Array, "R I"],
    w: Array,
    scale: Float[Array, "*L O G"],
    mins: Float[Array, "*L O G"] | None = None,
    layer: Array | int | None = None,
) -> Float[Array, "R O"]:
    """``x @ dequantize(w).T`` by the kernel, with ``x`` rounded to int8 per block of 32.
    ``w``: int8 ``[O, I]`` or packed int4 ``uint8 [O, I / 2]`` (``jaxllm.quantize.pack_int4``);
    ``scale``: one per group of ``I / G`` inputs; ``mins``: asymmetric int4 (``w = scale *
    u + min`` for the unsigned nibble ``u``), else symmetric (``scale * (u - 8)``). All three
    may be stacks of layers (a leading ``L``), of which ``layer`` is read in place."""
    _require()
    rows, width = x.shape
    outputs, groups = scale.shape[-2:]
    bits = 8 if w.dtype == jnp.int8 else 4
    has_min = mins is not None
    out = jax.ShapeDtypeStruct((rows, outputs), jnp.float32)
    return jax.ffi.ffi_call("jaxllm_qmatmul", out)(
        x.astype(jnp.float32),
        w,
        scale.astype(jnp.float32),
        mins.astype(jnp.float32) if has_min else jnp.zeros((1, 1), jnp.float32),
        _layer(layer),
        bits=np.int32(bits),
        group=np.int32(width // groups),
        has_min=np.int32(has_min),
    )


def round_activations(x: Float[Array, "R I"]) -> Float[Array, "R I"]:
    """``x`` as the kernel sees it (rounded to int8 per block of 32, then back to float):
    the reference for tests and for XLA code that must agree with the kernel."""
    rows, width = x.shape
    blocks = x.astype(jnp.float32).reshape(rows, width // BLOCK, BLOCK)
    d = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / 127.0
    inv = jnp.where(d > 0, 1.0 / jnp.where(d > 0, d, 1.0), 0.0)
    return (jnp.round(blocks * inv) * d).reshape(rows, width)
