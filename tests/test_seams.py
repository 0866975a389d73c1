"""The paths to wrong numbers or lost work that an outside review found, each closed (issue: results a user can
trust): unverified adapters, out_proj adapters and the original, the errors the CLIs show, --overwrite over a
base, --resume of a finished run and its extension, wandb failures, damaged vs mismatched checkpoints."""
import json
import warnings

import jax
import numpy as np
import pytest

from chest_jax import checkpoint as ckpt
from chest_jax import config as C
from chest_jax import interop, loading, runlog, train, trees
from chest_jax.lora import lora_leaves, params_fingerprint
from chest_jax.train import TrainingError, run_training
from conftest import quiet

LORA = ["ch_estimation.peft={r: 2, lora_alpha: 4, lora_dropout: 0.0}", "dataset.channel_type=[InF_Los]",
        "training.num_iter=3", "training.evaluation_step=3", "training.model_save_step=3"]


@pytest.fixture(scope="module")
def base_and_lora(tmp_path_factory):
    from conftest import tiny_overrides
    tmp = tmp_path_factory.mktemp("seams")
    base = run_training(C.load(None, tiny_overrides(tmp, "training.num_iter=3", "training.evaluation_step=3",
                                                    "training.saved_model_name=base")), kind="base", log=quiet,
                        progress=False)
    lora_cfg = C.load(None, tiny_overrides(tmp, *LORA, f"training.pretrained_model_name={base.run_dir}",
                                           "training.saved_model_name=lora"))
    lora = run_training(lora_cfg, kind="lora", log=quiet, progress=False)
    return tmp, base.run_dir, lora.run_dir, lora_cfg


def test_adapter_without_a_base_fingerprint_attaches_with_a_loud_warning(base_and_lora, tmp_path):
    _, base_dir, lora_dir, lora_cfg = base_and_lora
    lora, _, meta = ckpt.load_adapter(lora_dir / "adapter")
    unverified = ckpt.save_adapter(tmp_path / "unverified", lora_leaves(lora), lora_cfg, base_fingerprint=None,
                                   step=meta["step"], extra={"imported_from": "peft_dir"})
    model, _, _ = loading.restore_base(base_dir, lora_cfg, config_source="test")
    lines = []
    loading.attach_adapter(model, unverified, base_fingerprint=params_fingerprint(loading.model_params(model)),
                           key=jax.random.key(0), log=lines.append)
    assert len(lines) == 1 and "WARNING" in lines[0] and "UNVERIFIED" in lines[0] and "peft_dir" in lines[0]
    # with a fingerprint it is checked: silent on its own base, refused on another
    lines.clear()
    model, _, _ = loading.restore_base(base_dir, lora_cfg, config_source="test")
    loading.attach_adapter(model, lora_dir / "adapter", base_fingerprint=params_fingerprint(
        loading.model_params(model)), key=jax.random.key(0), log=lines.append)
    assert lines == []
    model, _, _ = loading.restore_base(base_dir, lora_cfg, config_source="test")
    with pytest.raises(ckpt.CheckpointError, match="trained on a different base"):
        loading.attach_adapter(model, lora_dir / "adapter", base_fingerprint="0" * 64, key=jax.random.key(0),
                               log=lines.append)


def _small_lora(out_proj_b):
    """LoRA leaves for the tiny model's one layer; out_proj lora_B set to `out_proj_b`, the rest random."""
    rng = np.random.default_rng(0)
    lora = {}
    for module in interop.LORA_MODULES:
        fan_in, fan_out = {("ffnn_linear1",): (16, 32), ("ffnn_linear2",): (32, 16)}.get(module, (16, 16))
        lora[("ch_tf", "_layers", 0, *module, "lora_A")] = rng.normal(size=(fan_in, 2)).astype(np.float32)
        b = out_proj_b if module[-1] == "out_proj" else rng.normal(size=(2, fan_out))
        lora[("ch_tf", "_layers", 0, *module, "lora_B")] = np.broadcast_to(b, (2, fan_out)).astype(np.float32)
    return trees.unflatten(lora)


def test_out_proj_adapters_warn_on_export_and_import_and_zero_ones_do_not(tmp_path):
    peft = C.PeftConfig(r=2, lora_alpha=4.0, lora_dropout=0.0)
    with pytest.warns(interop.OutProjAdapterWarning, match="out_proj.*merge_and_unload"):
        directory = interop.save_peft_adapter(tmp_path / "trained", peft, _small_lora(0.5))
    with pytest.warns(interop.OutProjAdapterWarning, match="merge_and_unload"):
        interop.load_peft_adapter(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error", interop.OutProjAdapterWarning)  # a zero out_proj lora_B is what the original
        zero = interop.save_peft_adapter(tmp_path / "zero", peft, _small_lora(0.0))  # computes: no warning
        interop.load_peft_adapter(zero)


def test_cli_prints_user_errors_as_one_line_and_bugs_with_their_traceback(tiny_cfg, tmp_path, monkeypatch, capsys):
    from conftest import tiny_overrides

    overrides = tiny_overrides(tmp_path, "training.num_iter=2")
    monkeypatch.setattr(train, "run_training", lambda *a, **k: (_ for _ in ()).throw(
        TrainingError("the thing to fix")))
    assert train.cli("base", ["--no-progress", *overrides]) == 2
    assert capsys.readouterr().err.strip() == "error: the thing to fix"
    with pytest.raises(TrainingError):  # --debug shows the user error's traceback too
        train.cli("base", ["--no-progress", "--debug", *overrides])
    # any other exception is a bug: it is not dressed up as a user error
    monkeypatch.setattr(train, "run_training", lambda *a, **k: (_ for _ in ()).throw(ValueError("internal")))
    with pytest.raises(ValueError, match="internal"):
        train.cli("base", ["--no-progress", *overrides])


def test_overwrite_never_deletes_the_base_a_lora_run_starts_from(base_and_lora):
    tmp, base_dir, _, _ = base_and_lora
    from conftest import tiny_overrides
    before = params_fingerprint(loading.model_params(loading.load_model(str(base_dir))[0]))
    cfg = C.load(None, tiny_overrides(tmp, *LORA, f"training.pretrained_model_name={base_dir}",
                                      f"training.saved_model_name={base_dir.name}"))
    with pytest.raises(TrainingError, match="--overwrite"):
        run_training(cfg, kind="lora", overwrite=True, log=quiet, progress=False)
    assert params_fingerprint(loading.model_params(loading.load_model(str(base_dir))[0])) == before


def test_resume_of_a_finished_run_says_so_and_a_larger_num_iter_extends_it(tiny_cfg):
    cfg = tiny_cfg("training.num_iter=4", "training.evaluation_step=4", "training.model_save_step=4")
    first = run_training(cfg, kind="base", log=quiet, progress=False)
    lines = []
    again = run_training(cfg, kind="base", resume=True, log=lines.append, progress=False)
    assert again.final_step == 4 and any("complete" in line for line in lines)
    lines.clear()
    longer = tiny_cfg("training.num_iter=6", "training.evaluation_step=4", "training.model_save_step=4")
    extended = run_training(longer, kind="base", resume=True, log=lines.append, progress=False)
    assert extended.final_step == 6 and extended.run_dir == first.run_dir
    assert any("extending training.num_iter from 4 to 6" in line for line in lines)
    assert ckpt.read_meta(first.run_dir / "final")["step"] == 6
    with pytest.raises(TrainingError, match="shortened"):
        run_training(tiny_cfg("training.num_iter=5", "training.evaluation_step=4", "training.model_save_step=4"),
                     kind="base", resume=True, log=quiet, progress=False)


def test_a_failing_wandb_log_never_fails_the_run(tiny_cfg, tmp_path):
    class Broken:
        finished = False

        def log(self, *a, **k):
            raise RuntimeError("wandb is down")

        def finish(self):
            Broken.finished = True

    lines = []
    metrics = runlog.MetricsLog(tmp_path, tiny_cfg(), lines.append)
    metrics.wandb_run = Broken()
    metrics.write({"step": 1, "loss": 0.5})
    metrics.write({"step": 2, "loss": float("nan")})  # mirroring stopped; the record still goes to the file
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": 0.5}, {"step": 2, "loss": None}]
    assert any("wandb.log failed" in line for line in lines) and metrics.wandb_run is None


def test_a_mismatched_checkpoint_stops_and_is_not_taken_for_damage(tiny_cfg):
    """A structure mismatch (the config changed) raises CheckpointMismatchError and moves nothing aside; only
    CheckpointDamagedError makes --resume skip a checkpoint (that path: test_faults, truncated checkpoint)."""
    from chest_jax.optim import make_optimizer

    cfg = tiny_cfg("training.num_iter=4", "training.evaluation_step=2", "training.model_save_step=2")
    result = run_training(cfg, kind="base", log=quiet, progress=False)
    model = loading.new_model(cfg, jax.random.key(0))
    params = loading.abstract_model_params(model)
    opt = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       make_optimizer(cfg.training).init(loading.model_params(model)))
    other = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] + 1,) + x.shape[1:], x.dtype), params)
    checkpoints = ckpt.TrainCheckpoints(result.run_dir, keep_period=2)
    lines = []
    with pytest.raises(ckpt.CheckpointMismatchError):
        checkpoints.restore_latest(other, opt, expected_from="test", warn=lines.append)
    assert sorted(checkpoints.all_steps()) == [2, 4] and lines == []
    assert not (result.run_dir / "damaged_checkpoints").exists()
    assert issubclass(ckpt.CheckpointMismatchError, ckpt.CheckpointError)
    assert not issubclass(ckpt.CheckpointMismatchError, ckpt.CheckpointDamagedError)
    checkpoints.close()
