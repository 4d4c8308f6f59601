"""Which kind of machine a computation runs on: the one question behind backend-specific paths.

Kernels are chosen by the platform a computation is *lowered* for (`by_platform`, on
`jax.lax.platform_dependent`), never by the Python process's default backend: an
ahead-of-time `jax.export(..., platforms=["tpu"])` on a CPU host must pick the TPU path.
The fused attention kernels (`attention.kernels`), the MoE's grouped matmul (`moe.gmm`:
`jax.lax.ragged_dot` on GPU/TPU, which XLA:CPU lowers densely) and its dropless all-to-all
(`moe.parallel`: `jax.lax.ragged_all_to_all`, which XLA:CPU lacks) all go through it.
`platform_of` / `is_accelerator` remain for accounting (peak FLOP/s of the machine at hand).
"""

from __future__ import annotations

import contextlib
import os

import jax

ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


def by_platform(args, *, cpu, tpu=None, cuda=None):
  """`cpu(*args)`, `tpu(*args)` or `cuda(*args)` by the platform the computation is lowered for.

  `cpu` is also the branch of every other platform (rocm, ...); a missing branch is `cpu`.
  All branches are traced and must return the same shapes; lowering keeps only the one of
  its platform (exporting for several platforms at once keeps a switch, and a compiled
  Pallas kernel in any branch then fails to lower for the others: export one at a time).
  When every branch is `cpu`, or inside `for_this_host()` on a CPU-only process, nothing is
  staged and `cpu(*args)` runs directly.
  """
  tpu, cuda = tpu or cpu, cuda or cpu
  if (tpu is cpu and cuda is cpu) or _HOST_ONLY.value == "cpu":
    return cpu(*args)
  return jax.lax.platform_dependent(*args, default=cpu, tpu=tpu, cuda=cuda)


PLATFORMS_ENV = "EFFICIENT_ATTN_PLATFORMS"

# Part of jit's cache key (jax.make_user_context): a trace made inside `for_this_host` is never reused by
# a trace outside it, such as `jax.export(..., platforms=["tpu"])` of the same function later on.
_HOST_ONLY = jax.make_user_context(default_value=None)


@contextlib.contextmanager
def for_this_host():
  """Within: traces are for this process's own devices, so a CPU-only process stages only `by_platform`'s
  CPU branch (tracing the Pallas kernels that lowering would drop cost ~0.45 s per compile of a softmax
  LM step). The trainer, evaluation, generation and benchmarks run inside it; `jax.export` and
  `.lower(lowering_platforms=...)` outside it see every branch, as does everything when
  $EFFICIENT_ATTN_PLATFORMS names an accelerator (e.g. `cpu,tpu`).
  """
  env = os.environ.get(PLATFORMS_ENV, "")
  wanted = [p.strip().lower() for p in env.split(",") if p.strip()]
  host_only = jax.default_backend() == "cpu" and not any(p in ACCELERATORS for p in wanted)
  with _HOST_ONLY("cpu" if host_only else None):
    yield


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
