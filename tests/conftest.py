"""Test setup: 8 emulated CPU devices and an offline Hugging Face stack.

Both must be set before jax (or datasets) is first imported, which is why they
live at the top of conftest.py rather than in a fixture.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
