"""Test-wide settings: JAX on the CPU, a shared PRNG key fixture, the suite's schedule and compilation cache.

Strict dtype promotion is not switched on globally (optax's Adam bias
correction mixes int and float scalars); tests that check dtype hygiene use
``jax.numpy_dtype_promotion("strict")`` locally.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny Hugging Face Llama folder loaded by us: ``(directory, params, config, tokenizer)``."""
    from hf_models import load_hf_llama

    return load_hf_llama(tmp_path_factory.mktemp("llama"))


# The longest test modules, longest first (from `--durations` runs on 2 cores). `make test` runs
# `pytest -n 2 --dist loadscope --no-loadscope-reorder`: each module runs whole on one worker (its module
# fixtures are built once), in this order, so the long ones start first and the short ones even out the end.
LONG_MODULES = ["test_llama_cpp", "test_gemma3", "test_fused_sweep", "test_ray", "test_sharding", "test_faults",
                "test_benchmarks", "test_sweep", "test_multihost", "test_gguf_runner", "test_methods_runner"]


def pytest_collection_modifyitems(config, items):
    """Put the modules of :data:`LONG_MODULES` first, in its order (a stable sort: the rest keeps its order)."""
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole test session, unless one is set already.

    The controlling process makes the folder before the pytest-xdist workers
    start; they, and the processes tests start (``lora-jax`` commands, scripts),
    inherit it through the environment. A program compiled once in the session
    (by any test or process) is then read back instead of compiled again: the
    same executable, so no result changes. The folder is removed at the end.
    """
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        path = tempfile.mkdtemp(prefix="lora-jax-tests-xla-")
        config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
        os.environ["JAX_COMPILATION_CACHE_DIR"] = path
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1.0)))
