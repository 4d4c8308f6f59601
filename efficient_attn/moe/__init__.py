"""Mixture of experts: switch / top-k / expert-choice routing, capacity and dropless
dispatch, expert parallelism over a device mesh.

    y_BTD, aux = moe_ffn(x_BTD, params, *, top_k=1, capacity_factor=1.25,
                         router="tokens_choose", dropless=False, jitter=0.0, rng=None,
                         activation="gelu", mesh=None, expert_axis="expert")

Modules: router.py (who goes where, as a `Slots` or `Pairs` record; aux losses),
dispatch.py (moving tokens on one device), gmm.py (the expert MLP, grouped matmuls),
parallel.py (shard_map + all-to-all), ffn.py (`moe_ffn`, FLOPs, aux collection).
The Flax module is `efficient_attn.layers.MoEFeedForward`.
"""

from efficient_attn.moe.dispatch import (
    capacity_experts,
    capacity_slots,
    combine_slots,
    dispatch_slots,
    dropless_experts,
    expert_capacity,
    sort_by_expert,
)
from efficient_attn.moe.ffn import ACTIVATIONS, ROUTERS, collect_aux, flops_per_token, moe_ffn, run_experts
from efficient_attn.moe.gmm import block_mlp, bulk_block_mlp, expert_mlp, ragged_matmul, ragged_mlp
from efficient_attn.moe.parallel import (
    reference_ragged_all_to_all,
    sharded_capacity_experts,
    sharded_dropless_experts,
)
from efficient_attn.moe.router import (
    ROUTES,
    Pairs,
    Slots,
    experts_choose,
    load_balancing_loss,
    router_aux,
    router_logits,
    router_z_loss,
    tokens_choose,
)

__all__ = [
    "moe_ffn", "flops_per_token", "collect_aux", "ROUTERS", "ACTIVATIONS", "run_experts",
    "router_logits", "tokens_choose", "experts_choose", "load_balancing_loss", "router_z_loss", "router_aux",
    "ROUTES", "Slots", "Pairs",
    "expert_capacity", "capacity_slots", "dispatch_slots", "combine_slots", "capacity_experts", "sort_by_expert",
    "dropless_experts", "expert_mlp", "ragged_matmul", "block_mlp", "bulk_block_mlp", "ragged_mlp",
    "sharded_capacity_experts", "sharded_dropless_experts", "reference_ragged_all_to_all",
]
