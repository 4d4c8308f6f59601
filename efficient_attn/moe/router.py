"""Routing for mixture-of-experts layers: which expert each token goes to, with what weight.

Shapes use the legend of `efficient_attn/__init__.py`: G token groups, S tokens per
group, E experts, C expert capacity, D model dim, and k = `top_k` (choices per token).
`moe_ffn` uses one sequence as one group (G = B, S = T), so routing never depends on
how the batch is split over devices.

Everything here runs in float32, whatever the model dtype: the Switch Transformer
(Fedus et al. 2021, §2.4, "selective precision") found bfloat16 routers unstable.
All functions are pure and cost O(G·S·E) (plus O(G·S·D·E) for the router matmul).

A router returns a record (as flaxformer's routing.py does), and `moe_ffn` runs the
experts by the record's type, never by the router's name:
  - `Slots` (token_GEC, gate_GEC): each expert's C slots per group, filled by tokens
    choosing with a capacity (`route_capacity`) or by experts choosing (`route_experts_choose`);
  - `Pairs` (expert_GSk, gate_GSk): every token's k choices, all kept (`route_dropless`).
Both carry `expert_GSk` (the tokens' own top-k preferences) and `dropped_fraction`, what
`router_aux` needs. `ROUTES` registers them by (router name, dropless): a new router is
one function returning a record plus one line there.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from efficient_attn.moe import dispatch


class Slots(NamedTuple):
  """Capacity routing: per group, expert and slot, the token sitting there and its weight.

  token_GEC int32 (S = an empty slot), gate_GEC float32 (0 in an empty slot),
  expert_GSk: the tokens' top-k preferences (for aux), dropped_fraction: a scalar.
  """
  token_GEC: jax.Array
  gate_GEC: jax.Array
  expert_GSk: jax.Array
  dropped_fraction: jax.Array


class Pairs(NamedTuple):
  """Dropless routing: every token's k (expert, gate) choices, none dropped.

  expert_GSk int32 (best first), gate_GSk float32, dropped_fraction: 0.
  """
  expert_GSk: jax.Array
  gate_GSk: jax.Array
  dropped_fraction: jax.Array


def router_logits(x_GSD, router_DE, *, jitter: float = 0.0, rng=None):
  """Router logits_GSE = (x ⊙ noise) @ router, in float32.

  `jitter` > 0 with an `rng` multiplies the router's input (not the experts' input)
  by noise drawn uniformly from [1 - jitter, 1 + jitter] (Switch Transformer, §2.4);
  with `rng=None` the router is deterministic (evaluation).
  """
  x = x_GSD.astype(jnp.float32)
  if jitter > 0 and rng is not None:
    x = x * jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - jitter, 1.0 + jitter)
  return jnp.einsum("GSD,DE->GSE", x, router_DE.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


def tokens_choose(probs_GSE, top_k: int):
  """Each token picks its `top_k` most probable experts.

  Returns (expert_GSk int32, gate_GSk float32), choices best first. With top_k = 1
  (Switch) the gate is the router probability itself; with top_k > 1 the k
  probabilities are renormalised to sum to 1 (GShard, Lepikhin et al. 2020; Mixtral).
  """
  gate_GSk, expert_GSk = jax.lax.top_k(probs_GSE, top_k)
  if top_k > 1:
    gate_GSk = gate_GSk / jnp.sum(gate_GSk, axis=-1, keepdims=True)
  return expert_GSk.astype(jnp.int32), gate_GSk


def experts_choose(probs_GSE, capacity: int):
  """Each expert takes the `capacity` tokens of its group that prefer it most.

  Expert-choice routing (Zhou et al. 2022): perfectly balanced by construction; a
  token may be taken by several experts or by none. Returns (token_GEC int32: the
  token in each expert slot, gate_GEC float32: its router probability for that expert).
  """
  gate_GEC, token_GEC = jax.lax.top_k(jnp.swapaxes(probs_GSE, 1, 2), capacity)
  return token_GEC.astype(jnp.int32), gate_GEC


def expert_fraction(expert_GSk, num_experts: int):
  """f_E: the fraction of (token, choice) assignments sent to each expert (sums to 1).

  Counted from the router's choices, before any capacity drop, as in the Switch loss.
  """
  counts_E = jnp.bincount(expert_GSk.reshape(-1), length=num_experts)
  return counts_E.astype(jnp.float32) / expert_GSk.size


def load_balancing_loss(probs_GSE, expert_GSk):
  """Switch Transformer auxiliary loss E · Σ_e f_e · P_e (eq. 4 of Fedus et al. 2021).

  f_e: fraction of assignments routed to expert e (top-k assignments / k for k > 1,
  not differentiable); P_e: mean router probability of expert e over all tokens.
  Equals 1 under perfectly uniform routing; the gradient pushes P towards uniform.
  """
  num_experts = probs_GSE.shape[-1]
  f_E = expert_fraction(expert_GSk, num_experts)
  P_E = jnp.mean(probs_GSE, axis=(0, 1))
  return num_experts * jnp.sum(f_E * P_E)


def router_z_loss(logits_GSE):
  """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)²."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_GSE, axis=-1)))


def router_aux(logits_GSE, probs_GSE, expert_GSk, dropped_fraction):
  """The `aux` dict of `moe_ffn`: two losses to add to the training loss, and telemetry.

  - load_balancing_loss: Switch E·Σ f_e·P_e (1.0 when balanced).
  - router_z_loss: mean logsumexp² of the router logits.
  - dropped_fraction: fraction of (token, choice) assignments over capacity (tokens
    choose) or of tokens no expert took (experts choose); 0 when dropless.
  - expert_fraction [E]: f_e, the load the router asks of each expert, before drops.
    With experts choosing, the real load is uniform by construction; expert_fraction
    and load_balancing_loss then describe the tokens' own top-k preferences.
  - router_entropy: mean entropy (nats) of the router distribution per token.
  - router_confidence: mean probability of each token's most probable expert.
  """
  num_experts = probs_GSE.shape[-1]
  probs_GSE_ng = jax.lax.stop_gradient(probs_GSE)
  return {
      "load_balancing_loss": load_balancing_loss(probs_GSE, expert_GSk),
      "router_z_loss": router_z_loss(logits_GSE),
      "dropped_fraction": jnp.asarray(dropped_fraction, jnp.float32),
      "expert_fraction": expert_fraction(expert_GSk, num_experts),
      "router_entropy": jnp.mean(jnp.sum(jax.scipy.special.entr(probs_GSE_ng), axis=-1)),
      "router_confidence": jnp.mean(jnp.max(probs_GSE_ng, axis=-1)),
  }


def route_capacity(probs_GSE, *, top_k: int, capacity_factor: float) -> Slots:
  """Tokens choose their top-k experts; each expert keeps C slots per group (GShard priority), the rest drop."""
  _, S, E = probs_GSE.shape
  expert_GSk, gate_GSk = tokens_choose(probs_GSE, top_k)
  capacity = dispatch.expert_capacity(S, E, top_k, capacity_factor)
  token_GEC, gate_GEC, keep_GSk = dispatch.capacity_slots(expert_GSk, gate_GSk, E, capacity)
  return Slots(token_GEC, gate_GEC, expert_GSk, jnp.mean(~keep_GSk))


def route_dropless(probs_GSE, *, top_k: int, capacity_factor: float) -> Pairs:
  """Tokens choose their top-k experts, and all of them are kept (`capacity_factor` is unused)."""
  del capacity_factor
  expert_GSk, gate_GSk = tokens_choose(probs_GSE, top_k)
  return Pairs(expert_GSk, gate_GSk, jnp.zeros((), jnp.float32))


def route_experts_choose(probs_GSE, *, top_k: int, capacity_factor: float) -> Slots:
  """Each expert takes its top-C tokens, C = expert_capacity(S, E, top_k, capacity_factor);
  dropped_fraction is the fraction of tokens no expert took."""
  G, S, E = probs_GSE.shape
  token_GEC, gate_GEC = experts_choose(probs_GSE, dispatch.expert_capacity(S, E, top_k, capacity_factor))
  taken_GS = jnp.zeros((G, S + 1), bool).at[jnp.arange(G)[:, None, None], token_GEC].set(True)
  expert_GSk, _ = tokens_choose(probs_GSE, top_k)
  return Slots(token_GEC, gate_GEC, expert_GSk, jnp.mean(~taken_GS[:, :S]))


# (router name, dropless) -> route(probs_GSE, *, top_k, capacity_factor) -> Slots | Pairs.
ROUTES = {
    ("tokens_choose", False): route_capacity,
    ("tokens_choose", True): route_dropless,
    ("experts_choose", False): route_experts_choose,
}
