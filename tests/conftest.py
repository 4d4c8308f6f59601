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
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="efficient_attn_jax_cache_")
if _CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
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


@pytest.fixture(autouse=True)
def _attention_rank_promotion_raise(request):
  if request.module.__name__.rsplit(".", 1)[-1] not in _STRICT_MODULES:
    yield
    return
  import jax

  with jax.numpy_rank_promotion("raise"):
    yield
