"""Which kind of machine a computation runs on: the one question behind backend-specific paths.

The MoE's grouped matmul (`moe.gmm`) and its dropless all-to-all (`moe.parallel`) have a
native path on GPU/TPU (`jax.lax.ragged_dot`, `jax.lax.ragged_all_to_all`) that XLA:CPU
either lowers densely or lacks; both ask `is_accelerator`.
"""

from __future__ import annotations

import jax

ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def platform_of(where=None) -> str:
  """The platform name ("cpu", "gpu", "tpu", ...) of `where`.

  `where`: a platform name, a mesh (the platform of its devices), or None (the default
  backend). An `AbstractMesh` has no devices, so it too means the default backend.
  """
  if isinstance(where, str):
    return where
  devices = getattr(where, "devices", None)
  return devices.flat[0].platform if devices is not None else jax.default_backend()


def is_accelerator(where=None) -> bool:
  """True on GPU or TPU (see `platform_of` for what `where` may be)."""
  return platform_of(where) in ACCELERATORS
