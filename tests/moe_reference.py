"""Independent references for the MoE tests: every token through its chosen experts.

`moe_reference` is float64 NumPy with explicit loops (routing decided token by token,
capacity counted in GShard priority order). `dense_moe_jnp` recomputes the same layer
densely in jnp — every expert on every token, weighted by a [B, T, E] combine matrix
built from the reference's routing — so its gradients can be compared too.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def expert_np(x_D, p, e, act=gelu_tanh):
  h = x_D @ p["w_in"][e]
  h = act(x_D @ p["w_gate"][e]) * h if "w_gate" in p else act(h)
  return h @ p["w_out"][e]


def moe_reference(x, params, *, top_k=1, capacity_factor=1.25, router="tokens_choose", dropless=False,
                  act=gelu_tanh):
  """Returns (y [B, T, D] float64, dropped_fraction, combine_BTE, topk_BTE).

  combine_BTE[b, t, e] = 1 where expert e processed token t (kept); topk_BTE marks the
  router's top-k choices (the set the gates are renormalised over).
  """
  x = np.asarray(x, np.float64)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  B, T, D = x.shape
  E = p["router"].shape[1]
  probs = softmax(x @ p["router"])
  C = min(T, max(1, math.ceil(capacity_factor * T * top_k / E - 1e-9)))
  y = np.zeros_like(x)
  combine = np.zeros((B, T, E), bool)
  topk = np.zeros((B, T, E), bool)
  dropped = 0
  for b in range(B):
    if router == "experts_choose":
      for e in range(E):
        for t in np.argsort(-probs[b, :, e], kind="stable")[:C]:
          combine[b, t, e] = True
          y[b, t] += probs[b, t, e] * expert_np(x[b, t], p, e, act)
      dropped += np.sum(~combine[b].any(-1))
      continue
    choice = np.argsort(-probs[b], axis=-1, kind="stable")[:, :top_k]  # [T, k]
    gates = np.take_along_axis(probs[b], choice, -1)
    if top_k > 1:
      gates = gates / gates.sum(-1, keepdims=True)
    count = np.zeros(E, int)
    for j in range(top_k):  # GShard priority: all first choices, then all second choices
      for t in range(T):
        e = choice[t, j]
        topk[b, t, e] = True
        if dropless or count[e] < C:
          count[e] += 1
          combine[b, t, e] = True
          y[b, t] += gates[t, j] * expert_np(x[b, t], p, e, act)
        else:
          dropped += 1
  total = B * T if router == "experts_choose" else B * T * top_k
  return y, dropped / total, combine, topk


def dense_moe_jnp(x, params, combine_BTE, topk_BTE, top_k=1, act=jax.nn.gelu):
  """The same layer, differentiable: all experts on all tokens, masked by the reference routing."""
  probs = jax.nn.softmax(jnp.einsum("BTD,DE->BTE", x, params["router"]), -1)
  weight = probs * combine_BTE
  if top_k > 1:
    weight = weight / jnp.sum(probs * topk_BTE, -1, keepdims=True)
  h = jnp.einsum("BTD,EDF->BTEF", x, params["w_in"])
  h = act(jnp.einsum("BTD,EDF->BTEF", x, params["w_gate"])) * h if "w_gate" in params else act(h)
  y = jnp.einsum("BTE,BTEF,EFD->BTD", weight, h, params["w_out"])
  if "shared_w_in" in params:
    hs = x @ params["shared_w_in"]
    hs = act(x @ params["shared_w_gate"]) * hs if "shared_w_gate" in params else act(hs)
    y = y + hs @ params["shared_w_out"]
  return y
