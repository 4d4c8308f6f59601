"""One rules table places params and activations; sharded training compiles without a full reshard."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from efficient_attn import sharding
from efficient_attn.config import ModelConfig
from efficient_attn.model import TransformerLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARNING = "Involuntary full rematerialization"


def mesh(**sizes):
  return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **sizes}, jax.devices()[:8])


def test_logical_spec_reads_the_rules_table():
  m = mesh(data=2, fsdp=4)
  # an activation: "batch" claims fsdp first, so "embed" stays whole
  assert sharding.logical_spec(("batch", "length", "embed"), m) == P(("data", "fsdp", "expert"), "context", None)
  assert sharding.logical_spec(("embed", "mlp"), m) == P("fsdp", "tensor")
  assert sharding.logical_spec(("vocab", None), m) == P("tensor", None)
  # with a shape, a dimension keeps the axes its size divides
  assert sharding.logical_spec(("batch", "length"), m, shape=(2, 64)) == P(("data", "expert"), "context")
  # only the axes a mesh has
  small = jax.make_mesh((2, 4), ("data", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  assert sharding.logical_spec(("batch", "embed"), small) == P(("data", "expert"), None)
  assert sharding.batch_sharding(m, 3).spec == P(sharding.BATCH_AXES, "context", None)


def test_params_placed_by_flax_and_by_the_table_agree():
  """Flax's logical_to_mesh (params) and sharding.logical_spec (activations, MoE specs) read RULES alike."""
  cfg = ModelConfig(num_layers=1, d_model=64, num_heads=4, ffn_dim=128, num_experts=4)
  boxed = jax.eval_shape(TransformerLM(cfg).init, jax.random.key(0), jnp.zeros((8, 16), jnp.int32))["params"]
  m = mesh(fsdp=2, tensor=2, expert=2)
  names = nn.get_partition_spec(boxed)
  flax_specs = jax.tree.leaves(nn.logical_to_mesh_sharding(names, m, sharding.RULES))
  ours = [sharding.logical_spec(tuple(n), m) for n in jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, P))]
  assert [s.spec for s in flax_specs] == ours


def test_constrain_places_activations_and_is_a_no_op_without_a_mesh():
  x = jnp.ones((8, 16, 32))
  f = jax.jit(lambda x: sharding.constrain(x * 2, ("batch", "length", "embed")))
  np.testing.assert_array_equal(f(x), x * 2)  # no mesh: unchanged
  m = mesh(data=2, fsdp=4)
  with jax.set_mesh(m):
    y = f(x)
  assert y.sharding.is_equivalent_to(jax.NamedSharding(m, P(("data", "fsdp", "expert"))), 3)


# Runs in a fresh process: the partitioner's warning is a C++ log line on stderr, printed only
# when a program is compiled (hence no compilation cache), and the control compiles last.
_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from efficient_attn import sharding
from efficient_attn.config import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig
from efficient_attn.train import train

def cfg(mesh, **model):
  return Config(model=ModelConfig(num_layers=1, d_model=64, num_heads=4, ffn_dim=128, **model),
                train=TrainConfig(steps=3, batch_size=8, seq_len=64, warmup_steps=1, log_every=1,
                                  checkpoint_every=3, eval_batches=1),
                data=DataConfig(val_fraction=0.0), mesh=mesh)

def losses(workdir):
  return [r["loss"] for r in map(json.loads, open(workdir + "/metrics.jsonl")) if "loss" in r]

cases = {"mesh": (MeshConfig(data=1, fsdp=2, tensor=2, expert=2), {"num_experts": 4, "top_k": 2})}
out = {}
for name, (mesh, model) in cases.items():
  for where, devices, m in (("mesh", jax.devices(), mesh), ("one", jax.devices()[:1], MeshConfig(data=1))):
    print(f"@@ {name}/{where}", file=sys.stderr, flush=True)
    train(cfg(m, **model), f"{sys.argv[1]}/{name}_{where}", devices=devices, progress=False)
    out[f"{name}/{where}"] = losses(f"{sys.argv[1]}/{name}_{where}")

# Control: the lookup gradient the embedding used to have (batch-sharded rows scatter-added into
# a table sharded over fsdp in D), which XLA's SPMD partitioner can only do by replicating.
print("@@ control", file=sys.stderr, flush=True)
mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1, "expert": 1})
rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
scatter = jax.jit(lambda idx, upd: jnp.zeros((256, 64)).at[idx].add(upd), in_shardings=(rows, rows),
                  out_shardings=NamedSharding(mesh, P(None, "fsdp")))
scatter.lower(jax.ShapeDtypeStruct((8, 64), jnp.int32), jax.ShapeDtypeStruct((8, 64, 64), jnp.float32)).compile()
print("@@ end", file=sys.stderr, flush=True)
print(json.dumps(out))
"""


def _sections(stderr: str) -> dict:
  """stderr split at the script's "@@ name" markers."""
  parts, name = {}, None
  for line in stderr.splitlines():
    if line.startswith("@@ "):
      name = line[3:].strip()
      parts[name] = ""
    elif name:
      parts[name] += line + "\n"
  return parts


@pytest.mark.slow
def test_sharded_training_compiles_without_full_rematerialization(tmp_path):
  """FSDP, tensor and expert parallelism at once (fsdp=2 x tensor=2 x expert=2, a top-2 MoE of 4 experts as the
  layer's FFN): no involuntary full rematerialization while compiling the train step, and its losses
  equal one device's (rtol=2e-4: another summation order moves them ~1e-7 relative; a wrong collective or a
  lost shard would miss by orders of magnitude). The suite's sharded-training-equals-one-device test; the
  data axis across processes is tests/test_faults.py's two-process run."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(JAX_ENABLE_COMPILATION_CACHE="false", TF_CPP_MIN_LOG_LEVEL="0", JAX_PLATFORMS="cpu",
             XLA_FLAGS=os.environ["XLA_FLAGS"])  # the suite's 8 devices and compile flags (tests/conftest.py)
  r = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], env=env, cwd=REPO, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  sections = _sections(r.stderr)
  assert "end" in sections, r.stderr[-3000:]
  assert WARNING in sections["control"]  # the log is seen when it happens
  for name in ("mesh/mesh", "mesh/one"):
    assert WARNING not in sections[name], f"{name}: {sections[name][-2000:]}"
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert len(out["mesh/mesh"]) == 3
  np.testing.assert_allclose(out["mesh/mesh"], out["mesh/one"], rtol=2e-4)
