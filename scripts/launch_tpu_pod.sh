#!/usr/bin/env bash
# Cloud TPU pod: runs the same command on every worker of TPU VM $TPU_NAME
# (JAX finds the pod topology itself; efficient-attn calls jax.distributed.initialize()).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a scripts/launch_tpu_pod.sh train --workdir gs://bucket/runs/lm --set mesh.fsdp=8
#
# Assumes the repository is checked out at the same path on every worker and
# installed with `pip install -e ".[tpu]"`.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-$(pwd)}
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "cd ${REPO_DIR} && efficient-attn ${ARGS}"
