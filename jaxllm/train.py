"""Training: next-token loss, the AdamW schedule, and one jitted, sharded train step.

The train step sees the model the way serving does: the same ``ModelSpec`` (config, mesh,
logical-axis rules), the same split-once state flattened to a list of arrays, the same
forward pass. Batches are split over the ``act_batch`` mesh axes (``data`` under every
preset), parameters and optimizer moments are laid out by the parameters' logical axes, and
XLA inserts the gradient all-reduce. The train state is donated, so parameters and moments
are updated in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jaxtyping import Array, Float, Int

from jaxllm.params import ModelSpec


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up to ``peak_lr``, cosine decay to ``peak_lr * final_lr_ratio``
    at ``total_steps``, and gradients clipped to a global norm of ``clip_norm`` first."""

    total_steps: int
    warmup_steps: int = 100
    peak_lr: float = 3e-3
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip_norm: float = 1.0

    def schedule(self) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=self.peak_lr,
            warmup_steps=self.warmup_steps,
            decay_steps=self.total_steps,
            end_value=self.peak_lr * self.final_lr_ratio,
        )

    def optimizer(self) -> optax.GradientTransformation:
        # Norm scales (the only 1-D parameters) are not decayed towards zero: that would
        # shrink activations, not regularise a mapping.
        return optax.chain(
            optax.clip_by_global_norm(self.clip_norm),
            optax.adamw(
                self.schedule(),
                b1=self.b1,
                b2=self.b2,
                weight_decay=self.weight_decay,
                mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
            ),
        )


class TrainState(NamedTuple):
    step: Int[Array, ""]
    params: list[jax.Array]  # the model state's leaves, in ``jax.tree.flatten`` order
    opt_state: Any


def next_token_loss(logits: Float[Array, "B T V"], targets: Int[Array, "B T"]) -> Float[Array, ""]:
    """Mean cross-entropy in nats of predicting ``targets`` (the inputs shifted by one)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.mean(losses)


class Trainer:
    """Owns the jitted train and eval steps of one model spec and optimizer.

    ``batch`` arguments are ``[B, T + 1]`` int32 token windows: positions ``0..T-1`` are the
    inputs and ``1..T`` the targets. ``B`` must be a multiple of the ``data`` axis size.
    """

    def __init__(self, spec: ModelSpec, graphdef: nnx.GraphDef, state: nnx.State, opt):
        if spec.config.head_layout is not None:
            raise ValueError(
                "training a model whose attention heads are padded or copied over the tensor "
                "axis is not supported (each copy of a KV head would get its own gradient); "
                "build the ModelSpec with split_heads=False, or use a mesh whose tensor axis "
                "divides the heads"
            )
        self.spec, self.graphdef, self.opt = spec, graphdef, opt
        params, self._treedef = jax.tree.flatten(state)
        batch_axes = ("act_batch", "act_length")
        self.batch_sharding = lambda shape: spec.rules.sharding(batch_axes, shape, spec.mesh)
        # Initialising inside jit lays each moment out like its parameter; what jit leaves
        # on one device (step counters) is replicated, so every leaf lives on the mesh.
        replicated = NamedSharding(spec.mesh, jax.sharding.PartitionSpec())
        opt_state = jax.tree.map(
            lambda x: (
                x
                if x.sharding.device_set == replicated.device_set
                else jax.device_put(x, replicated)
            ),
            jax.jit(opt.init)(params),
        )
        step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
        self.state = TrainState(step, params, opt_state)
        shardings = jax.tree.map(lambda x: x.sharding, self.state)
        self._train_step = jax.jit(
            self._step, donate_argnums=0, out_shardings=(shardings, None, None)
        )
        self._eval_loss = jax.jit(self._loss)

    def model_state(self, state: TrainState | None = None) -> nnx.State:
        """The parameters as an ``nnx.State`` (with their logical axes), for saving."""
        return jax.tree.unflatten(self._treedef, (state or self.state).params)

    def put_batch(self, batch: np.ndarray) -> jax.Array:
        batch = np.asarray(batch, np.int32)
        return jax.device_put(batch, self.batch_sharding(batch.shape))

    def _loss(self, params, batch: Int[Array, "B T1"]) -> Float[Array, ""]:
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, params))
        tokens, targets = batch[:, :-1], batch[:, 1:]
        B, T = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        hidden, _ = model(tokens, positions)  # no KV pool: plain causal attention
        return next_token_loss(model.logits(hidden), targets)

    def _step(self, state: TrainState, batch: Int[Array, "B T1"]):
        loss, grads = jax.value_and_grad(self._loss)(state.params, batch)
        updates, opt_state = self.opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), loss, optax.tree.norm(grads)

    def train_step(self, batch: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """One optimizer step on ``batch``; returns (loss before the update, gradient norm)
        as device scalars, so the host does not wait for the step unless it reads them."""
        self.state, loss, grad_norm = self._train_step(self.state, self.put_batch(batch))
        return loss, grad_norm

    def eval_loss(self, batch: np.ndarray) -> float:
        """Mean next-token loss in nats on ``batch``, without updating anything."""
        return float(self._eval_loss(self.state.params, self.put_batch(batch)))
