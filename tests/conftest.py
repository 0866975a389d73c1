import os
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

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
