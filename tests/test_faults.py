"""Runs that survive faults and bad input: NaN, SIGTERM, a save killed midway, damaged checkpoints, bad files."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chest_jax import checkpoint as ckpt
from chest_jax import config as C
from chest_jax import loading, train
from chest_jax.train import TrainingError, run_training
from conftest import REPO, quiet, tiny_overrides


def _inject_nan_at(monkeypatch, bad_step):
    original = train.sample_batch

    def poisoned(step, *args):
        batch = original(step, *args)
        return batch._replace(inputs=jnp.where(step == bad_step, jnp.nan, batch.inputs))

    monkeypatch.setattr(train, "sample_batch", poisoned)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_cfg, monkeypatch):
    _inject_nan_at(monkeypatch, 13)
    cfg = tiny_cfg("training.evaluation_step=5", "training.model_save_step=5", "training.logging_step=1")
    with pytest.raises(TrainingError) as e:
        run_training(cfg, kind="base", log=quiet, progress=False)
    run_dir = Path(cfg.training.output_dir) / cfg.training.saved_model_name
    assert "step 13" in str(e.value) and str(run_dir / "checkpoints" / "10") in str(e.value)
    steps = ckpt.TrainCheckpoints(run_dir).all_steps()
    assert steps[-1] == 10 and not (run_dir / "final").exists()
    model = loading.new_model(cfg, jax.random.key(0))
    params = ckpt.restore_tree(run_dir / "checkpoints" / "10", loading.abstract_model_params(model),
                               expected_from="test")
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_nan_policy_skip_counts_and_continues(tiny_cfg, monkeypatch):
    _inject_nan_at(monkeypatch, 3)
    cfg = tiny_cfg("training.nan_policy=skip", "training.num_iter=10", "training.logging_step=1")
    result = run_training(cfg, kind="base", log=quiet, progress=False)
    import json
    records = [json.loads(l) for l in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("skipped_steps", 0) for r in records) == 1
    params = loading.model_params(loading.load_model(str(result.run_dir))[0])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def _cli(script, overrides, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / script), "--no-progress", *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path):
    # Long enough that the signal lands mid-training: at 150 steps a fast run (huge-page malloc) finished before
    # the SIGTERM arrived, and a signal after training is not this test's subject.
    common = tiny_overrides(tmp_path, "training.num_iter=1000", "training.evaluation_step=5000",
                            "training.model_save_step=5000", "training.logging_step=1")
    reference = run_training(__import__("chest_jax.config", fromlist=["load"]).load(
        None, [*common, "training.saved_model_name=reference"]), kind="base", log=quiet, progress=False)
    proc = _cli("train_base.py", [*common, "training.saved_model_name=victim"])
    metrics = tmp_path / "runs" / "victim" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by signal SIGTERM" in out and "--resume" in out
    steps = ckpt.TrainCheckpoints(tmp_path / "runs" / "victim").all_steps()
    assert steps and 0 < steps[-1] < 1000
    resumed = _cli("train_base.py", [*common, "training.saved_model_name=victim", "--resume"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    a = loading.model_params(loading.load_model(str(tmp_path / "runs" / "victim"))[0])
    b = loading.model_params(loading.load_model(str(reference.run_dir))[0])
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_sigterm_during_the_final_save_lets_the_final_model_be_written_whole(tiny_cfg, monkeypatch):
    # A signal that lands after the last step (final validation, checkpoint, model save) must not kill the
    # process halfway through writing the final model. Our own handler stands in for the default action, so a
    # signal that is not deferred fails this test instead of killing pytest.
    class NotDeferred(Exception):
        pass

    def undeferred(signum, frame):
        raise NotDeferred(signal.Signals(signum).name)

    original_save = train.ckpt.save_model

    def save_with_signal(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs at the next bytecode; give the signal time to arrive
        return original_save(*args, **kw)

    previous = signal.signal(signal.SIGTERM, undeferred)
    try:
        monkeypatch.setattr(train.ckpt, "save_model", save_with_signal)
        lines = []
        result = run_training(tiny_cfg("training.num_iter=4"), kind="base", log=lambda *a, **k: lines.append(a),
                              progress=False)
        assert signal.getsignal(signal.SIGTERM) is undeferred  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not result.interrupted and result.final_path is not None
    assert any("SIGTERM arrived after the last step" in str(a) for a in lines)
    assert ckpt.read_meta(result.final_path)["step"] == 4
    params = loading.model_params(loading.load_model(str(result.run_dir))[0])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


_KILLED_SAVE = """
import sys, numpy as np
from chest_jax import checkpoint as ckpt
c = ckpt.TrainCheckpoints(sys.argv[1])
small = {"w": np.arange(10, dtype=np.float32)}
c.save(1, small, {"m": np.zeros(2, np.float32)}, {"kind": "test"})
print("saved 1", flush=True)
big = {f"w{i}": np.random.default_rng(i).standard_normal(16_000_000).astype(np.float32) for i in range(8)}
print("saving 2", flush=True)
c.save(2, big, {"m": np.zeros(2, np.float32)}, {"kind": "test"})
print("saved 2", flush=True)
"""


def test_save_killed_midway_leaves_previous_checkpoint_restorable(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    for line in proc.stdout:
        if line.startswith("saving 2"):
            break
    ckdir = tmp_path / "checkpoints"
    deadline = time.time() + 60
    while time.time() < deadline and not any("tmp" in p.name for p in ckdir.iterdir()):
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert any("tmp" in p.name for p in ckdir.iterdir()), "the save finished before it could be killed"
    checkpoints = ckpt.TrainCheckpoints(tmp_path)
    assert checkpoints.all_steps() == [1]
    step, params, _, _ = checkpoints.restore_latest(
        {"w": jax.ShapeDtypeStruct((10,), np.float32)}, {"m": jax.ShapeDtypeStruct((2,), np.float32)},
        expected_from="test", warn=quiet)
    assert step == 1 and np.array_equal(params["w"], np.arange(10, dtype=np.float32))


def test_truncated_checkpoint_is_reported_and_skipped(tmp_path):
    overrides = tiny_overrides(tmp_path, "training.evaluation_step=5", "training.model_save_step=5")
    first = run_training(C.load(None, overrides), kind="base", stop_after=10, log=quiet, progress=False)
    newest = first.run_dir / "checkpoints" / "10" / "params"
    # Orbax (OCDBT) keeps array bytes in files under d/ folders, and which of them a read touches is its business:
    # truncate them all, as a crash during the write of the last blocks would.
    data_files = [p for p in newest.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 3)
    # a new process, as after a crash (this one may still cache what it wrote)
    proc = _cli("train_base.py", [*overrides, "--resume"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "checkpoint step 10 is unreadable and was skipped" in out and "at step 5" in out
    assert list((first.run_dir / "damaged_checkpoints").iterdir())
    assert ckpt.read_meta(first.run_dir / "final")["step"] == 20


@pytest.mark.parametrize("args, words", [
    (["--config", "configs/nope.yaml"], ["configs/nope.yaml", "does not exist"]),
    (["training.lr=fast"], ["training.lr", "'fast'"]),
    (["dataset.channel_type=[Mars_Los]"], ["dataset.channel_type[0]", "known channel types"]),
])
def test_bad_cli_input_gives_one_clear_message(args, words):
    proc = _cli("train_base.py", args)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in out and out.strip().startswith("error:")
    for w in words:
        assert w in out


def test_bad_pdp_dir_file_gives_one_clear_message(tmp_path):
    (tmp_path / "PDP_InF_Los.mat").write_bytes(b"not a mat file at all")
    proc = _cli("train_base.py", tiny_overrides(tmp_path, f"dataset.pdp_dir={tmp_path}",
                                                "dataset.channel_type=[InF_Los]"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in out
    assert "PDP_InF_Los.mat" in out
