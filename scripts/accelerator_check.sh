#!/usr/bin/env bash
# On a machine with a GPU or TPU (and jax[cuda12] / jax[tpu] installed): the fused-kernel tests on the chip,
# then `efficient-attn bench attention` (each family vs jax.nn.dot_product_attention, XLA and cuDNN, bf16,
# T up to 32K) and `bench moe`, printed as one table: time, peak device memory, TFLOP/s and share of the
# chip's peak. Stops after 5 minutes. DRY=1 runs the plumbing on CPU at toy sizes.
#
#   scripts/accelerator_check.sh | tee accelerator_check.md
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout "${CHECK_TIMEOUT:-300}" python scripts/accelerator_check.py
