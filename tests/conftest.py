"""Test setup: 8 emulated CPU devices, an offline Hugging Face stack, and a compilation cache.

All of it must be set before jax (or datasets) is first imported, which is why it
lives at the top of conftest.py rather than in a fixture. The persistent
compilation cache (a fresh temp dir per session, shared with the subprocesses the
tests start and with pytest-xdist's workers, which inherit this environment from the
controller) lets the many identical tiny train steps compile once.
"""

import os
import tempfile

if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit it
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite compiles hundreds of tiny programs and runs each a few times: LLVM's -O0 cuts a train step's
# compile by ~30-50% and the train tests' CPU time by ~28% (measured here). Same HLO, same semantics; set
# --xla_backend_optimization_level yourself in XLA_FLAGS to test another level.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# XLA's older (LLVM IR) CPU fusion emitters compile the suite's programs ~15% faster than the MLIR ones
# (a 2-layer MoE LM's train(): 6.6 -> 5.1 s, 6 and 3 runs here); the same HLO, the same operations.
if "--xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
# MFU's denominator: a given peak instead of a second of 2048² matmuls in every worker and subprocess
# (tests/test_flops.py measures it).
os.environ.setdefault("EFFICIENT_ATTN_PEAK_FLOPS", "1e11")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="efficient_attn_jax_cache_")
if _CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Token stores and trained tokenizers (efficient_attn.data.store) go to a fresh dir, not ~/.cache.
_DATA_CACHE = None if "EFFICIENT_ATTN_DATA_CACHE" in os.environ else tempfile.mkdtemp(prefix="efficient_attn_data_")
if _DATA_CACHE:
  os.environ["EFFICIENT_ATTN_DATA_CACHE"] = _DATA_CACHE


def pytest_sessionfinish(session, exitstatus):
  import shutil

  for path in (_CACHE, _DATA_CACHE):
    if path:
      shutil.rmtree(path, ignore_errors=True)


# Attention code must never rely on implicit rank promotion (users run with
# jax_numpy_rank_promotion="raise"): every attention test module runs under it.
_STRICT_MODULES = {"test_softmax", "test_local", "test_sparse", "test_linear", "test_performer", "test_masks",
                   "test_causality", "test_registry", "test_dropin", "test_dropin_families",
                   "test_gated_delta"}

import pytest  # noqa: E402  (after the environment above)


def pytest_configure(config):
  config.addinivalue_line("markers", "all_platforms: traces every platform's branch of by_platform (an export, or a"
                          " check of what staging costs on CPU); other tests trace only the CPU branch")
  config.addinivalue_line("markers", "slow: an end-to-end scenario that stays above ~15 CPU-seconds (processes,"
                          " signals, whole experiments). The README's command runs them; `-m 'not slow'` skips them")


# Longest files first (CPU-seconds, measured with --durations): `--dist loadfile` hands files to the two workers
# in collection order, so a long file collected last would leave one worker idle at the end.
_LONGEST_FIRST = ["test_exp_scaling_laws.py", "test_train.py", "test_experiments.py", "test_faults.py",
                  "test_context_train.py", "test_hybrid.py", "test_context.py", "test_gated_delta.py", "test_numerics.py",
                  "test_kernels.py", "test_model.py", "test_dropin.py", "test_exp_synthetic.py", "test_readme.py"]


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _trace_for_this_host(request):
  """Tests run as the trainer does (platform.for_this_host): a CPU-only process traces only the CPU branch
  of each kernel choice. Exports and the staging checks are marked all_platforms and see every branch."""
  if request.node.get_closest_marker("all_platforms") or os.environ.get("EFFICIENT_ATTN_TEST_ALL_PLATFORMS"):
    yield
    return
  from efficient_attn import platform

  with platform.for_this_host():
    yield


@pytest.fixture(autouse=True)
def _attention_rank_promotion_raise(request):
  if request.module.__name__.rsplit(".", 1)[-1] not in _STRICT_MODULES:
    yield
    return
  import jax

  with jax.numpy_rank_promotion("raise"):
    yield
