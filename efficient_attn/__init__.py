"""efficient_attn: efficient transformers in JAX/Flax.

Dimension legend (docstrings, einsum strings, shape-suffixed names):

    B batch · T query length · S key length · N query heads · K key/value heads ·
    H head dim · D model dim · F feed-forward dim · E experts · C expert capacity ·
    M random features · G token groups · L layers · V vocab.

Public API:
    efficient_attn.attention   softmax / local / block-sparse / linear / Performer attention, the
                               gated (RetNet, GLA, Mamba-2) and delta-rule (DeltaNet) recurrences,
                               the registry `ATTENTION`, `attend`, `flax_attention_fn`, decoding.
    efficient_attn.moe         `moe_ffn`: switch / top-k / experts-choose MoE, expert parallelism.
"""

import importlib

_LAZY = {"attention": "efficient_attn.attention", "moe": "efficient_attn.moe", "moe_ffn": "efficient_attn.moe"}
_LAZY.update({name: "efficient_attn.attention" for name in (
    "ATTENTION", "attend", "block_sparse_attention", "delta_rule_attention", "flax_attention_fn",
    "gated_linear_attention", "linear_attention", "local_attention", "performer_attention", "performer_projection",
    "softmax_attention")})


def __getattr__(name: str):
  """The public names load on first use: `import efficient_attn.data.build` (a tokenizing worker, the
  CLI's argument parsing) does not pay for importing JAX and Flax."""
  if name not in _LAZY:
    raise AttributeError(f"module 'efficient_attn' has no attribute {name!r}")
  module = importlib.import_module(_LAZY[name])
  value = module if name in ("attention", "moe") else getattr(module, name)
  globals()[name] = value
  return value


def __dir__():
  return sorted([*globals(), *_LAZY])


__version__ = "0.1.0"

__all__ = [
    "attention", "moe", "moe_ffn", "ATTENTION", "attend", "flax_attention_fn", "softmax_attention", "local_attention",
    "block_sparse_attention", "linear_attention", "performer_attention", "performer_projection",
    "gated_linear_attention", "delta_rule_attention",
]
