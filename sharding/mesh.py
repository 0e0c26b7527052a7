"""Device meshes with the four axes every jaxllm layout is written against.

A mesh always has the axes ``data`` (independent replicas of the model, each serving its own
share of the batch), ``fsdp`` (weights split along the model width, gathered per layer),
``expert`` (a mixture-of-experts layer's experts split across devices, each device running
the tokens routed to its own experts) and ``tensor`` (heads, MLP channels and vocabulary split
across devices), in that order: ``tensor`` is innermost because its collectives run in every
layer, so its devices should be neighbours. Axes the caller does not mention get size 1, so
the same logical rules work on every mesh, and a model without experts ignores ``expert``.

Axes are ``Auto``: XLA's partitioner chooses collectives for matmuls over sharded contracting
dims. ``jax.make_mesh`` defaults to ``Explicit`` axes since jax 0.10, which would reject those
matmuls, so the type is set on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES: tuple[str, ...] = ("data", "fsdp", "expert", "tensor")

MeshSpec = Mesh | Mapping[str, int] | str | None


def parse_mesh_spec(spec: Mapping[str, int] | str) -> dict[str, int]:
    """Turns ``"data=2,tensor=4"`` or ``{"data": 2, "tensor": 4}`` into a checked dict."""
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"mesh spec {spec!r}: expected 'axis=size' items, got {part!r}")
            if name.strip() in sizes:
                raise ValueError(f"mesh spec {spec!r}: axis {name.strip()!r} given twice")
            sizes[name.strip()] = int(value)
        spec = sizes
    unknown = set(spec) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {list(AXES)}")
    for name, size in spec.items():
        if not isinstance(size, int | np.integer) or size < 1:
            raise ValueError(f"mesh axis {name!r} must have a positive integer size, got {size!r}")
    return {name: int(spec.get(name, 1)) for name in AXES}


def make_mesh(spec: MeshSpec = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ``(data, fsdp, expert, tensor)`` mesh over ``devices`` (default: all devices).

    ``spec`` may be ``None`` (every device on ``tensor``), a dict or string of axis sizes, or
    a ready ``Mesh``: returned as is when its axes are exactly ``AXES``; a mesh over some of
    them in that order (e.g. the ``(data, fsdp, tensor)`` meshes of earlier versions) gets the
    missing axes inserted with size 1, same devices and axis types. The product of the sizes
    must equal the number of devices: a mesh that leaves devices idle is almost always a
    mistake in a launch script, so it is an error rather than a silent subset.
    """
    if isinstance(spec, Mesh):
        return _with_all_axes(spec)
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec({"tensor": len(devices)} if spec is None else spec)
    shape = tuple(sizes[name] for name in AXES)
    if int(np.prod(shape)) != len(devices):
        described = " x ".join(f"{n}={s}" for n, s in sizes.items() if s > 1) or "1"
        raise ValueError(
            f"mesh {described} needs {int(np.prod(shape))} devices but {len(devices)} are "
            f"available; give sizes whose product is {len(devices)}"
        )
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _with_all_axes(mesh: Mesh) -> Mesh:
    names = tuple(mesh.axis_names)
    if names == AXES:
        return mesh
    if [a for a in AXES if a in names] != list(names):
        raise ValueError(f"mesh axes must be {AXES} (or some of them in that order), got {names}")
    sizes = dict(mesh.shape)
    types = dict(zip(names, mesh.axis_types, strict=True))
    return Mesh(
        mesh.devices.reshape(tuple(sizes.get(a, 1) for a in AXES)),
        AXES,
        axis_types=tuple(types.get(a, AxisType.Auto) for a in AXES),
    )


def describe_mesh(mesh: Mesh) -> str:
    """``"data=2,tensor=4"``-style text for logs and model info (size-1 axes omitted)."""
    parts = [f"{name}={size}" for name, size in mesh.shape.items() if size > 1]
    return ",".join(parts) or "single-device"
