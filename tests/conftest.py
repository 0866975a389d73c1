import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

# One persistent XLA compilation cache for the session, shared with the subprocesses that tests start (they inherit
# the environment). The suite compiles the same tiny train step, validation and predict functions in dozens of tests,
# each time as a fresh closure that jit's in-memory cache cannot match, and compiling was over a third of the suite's
# time on the 2-core machine (tests/test_studies.py + tests/test_faults.py: 244 s without, 155 s with). The key
# covers the program, the devices, the compile options and XLA_FLAGS. A fresh directory per session, removed at
# exit, so no test depends on what an earlier run left; a cache directory given in the environment is used as is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _xla_cache = tempfile.mkdtemp(prefix="chest-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_xla_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

from chest_jax import config as C  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHEST_JAX_SHARED", REPO.parent / "shared"))

# A model and frame small enough for a CPU test: fft 512 (384 used subcarriers, 64 pilots), one layer, d_model 16.
TINY = [
    "dataset.fft_size=512", "dataset.num_guard_subcarriers=128", "dataset.ref_conf_dict.dmrs=[0, 384, 6]",
    "dataset.batch_size=8", "dataset.num_profiles=40", "dataset.channel_type=[InF_Los, RMa_Los]",
    "dataset.distance_range=[10, 100]",
    "ch_estimation.cond.length=384", "ch_estimation.transformer.length=384", "ch_estimation.transformer.n_token=32",
    "ch_estimation.transformer.d_model=16", "ch_estimation.transformer.n_head=2",
    "ch_estimation.transformer.dim_feedforward=32", "ch_estimation.transformer.num_layers=1",
    "ch_estimation.transformer.dropout=0.1",
    "training.lr=3e-3", "training.num_iter=20", "training.num_warmup_steps=1", "training.logging_step=5",
    "training.evaluation_step=10", "training.model_save_step=10", "training.validation_size=16",
    "training.evaluation_batch_size=2",
]


def tiny_overrides(tmp_path, *extra):
    return [*TINY, f"training.output_dir={tmp_path / 'runs'}", *extra]


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(*extra):
        return C.load(None, tiny_overrides(tmp_path, *extra))
    return make


def quiet(*_args, **_kw):
    pass
