"""The PyTorch reference timed in the same run as chest-jax, so that speed ratios compare like with like.

The model is `tests/torch_reference.py` (written from SPEC.md section 3, the parity target of the tests), built
with the benchmarked config's sizes. Measured, as `train_throughput.py` measures chest-jax:
  train step   forward + backward + Adam on one fixed pilots-only batch of the config's batch size, train mode
               (dropout on), the loss the original minimises (mean per-sample NMSE);
  inference    eval mode under torch.inference_mode on full num_symbol-symbol frames, batch 1 and 32.
torch uses every CPU core (torch.set_num_threads(os.cpu_count())), like XLA:CPU. Without torch installed
(`pip install -e ".[torch]"`) `measure` returns {"error": ...} and the ratios are null: no fixed figures from
another machine stand in for a measurement.

Two environments: `measure` times it inside the benchmark's process, so with whatever malloc settings chest-jax
runs under (huge pages, chest_jax/hostmem.py), and `measure_in_subprocess` runs this file as a script in the
environment the original's users have (the huge-page tunable taken out): the same code, the same batches.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

import _common  # (also puts the repository on sys.path)

INFER_BATCH_SIZES = (1, 32)


def _time(call: Callable[[], Any], min_calls: int, min_seconds: float) -> list[float]:
    call()  # warm-up: allocator and oneDNN primitive caches
    return _common.time_calls(call, min_calls, min_seconds)  # blocking on a None result is a no-op


def measure(cfg, batch_inputs: np.ndarray, batch_h: np.ndarray, full_inputs: dict[int, np.ndarray], *,
            min_calls: int = 5, min_seconds: float = 2.0) -> dict[str, Any]:
    """Train step and inference of the PyTorch reference at `cfg`'s sizes, on the same batches chest-jax is
    timed on: batch_inputs (B, 1, K, 2) float32 and batch_h (B, K, 2) for training, full_inputs {batch size:
    (b, S, K, 2)} for inference. Returns samples/s and median ms of each (see the module docstring)."""
    try:
        import torch
    except ImportError:
        return {"error": "torch is not installed (pip install -e '.[torch]'): no same-run PyTorch reference"}
    sys.path.insert(0, str(_common.REPO / "tests"))
    import torch_reference as ref

    tf, cond = cfg.ch_estimation.transformer, cfg.ch_estimation.cond
    dims = ref.ReferenceDims(length=tf.length, step_size=cond.step_size, num_layers=tf.num_layers,
                             d_model=tf.d_model, n_token=tf.n_token, n_head=tf.n_head,
                             dim_feedforward=tf.dim_feedforward, dropout=tf.dropout,
                             dmrs=tuple(cfg.dataset.ref_conf_dict.dmrs))
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = ref.Estimator_v4(dims)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)
    x = torch.from_numpy(np.array(batch_inputs, dtype=np.float32))
    h = torch.from_numpy(np.array(batch_h, dtype=np.float32))

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        h_est, _ = model(x)
        loss = (torch.sum((h_est - h) ** 2, dim=(1, 2)) / torch.sum(h ** 2, dim=(1, 2))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.training.max_norm or float("inf"))
        opt.step()

    out: dict[str, Any] = {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
                           "model": "tests/torch_reference.py Estimator_v4"}
    seconds = _time(train_step, min_calls, min_seconds)
    out["train"] = {"median_ms": 1e3 * float(np.median(seconds)), "calls": len(seconds),
                    "samples_per_s": len(batch_inputs) / float(np.median(seconds))}
    model.eval()
    for b, inputs in full_inputs.items():
        xb = torch.from_numpy(np.array(inputs, dtype=np.float32))

        def infer(xb=xb):
            with torch.inference_mode():
                model(xb)

        seconds = _time(infer, min_calls, min_seconds)
        out[f"infer_bs{b}"] = {"median_ms": 1e3 * float(np.median(seconds)), "calls": len(seconds),
                               "samples_per_s": b / float(np.median(seconds))}
    return out


def measure_in_subprocess(cfg, batch_inputs: np.ndarray, batch_h: np.ndarray, full_inputs: dict[int, np.ndarray], *,
                          env: Mapping[str, str], min_calls: int = 5, min_seconds: float = 2.0,
                          timeout_s: float = 1800.0) -> dict[str, Any]:
    """`measure` in a fresh Python process started with `env` (e.g. `hostmem.without_huge_pages(os.environ)`): the
    config and batches go through a temporary directory; {"error": ...} when the process fails."""
    from chest_jax import config as config_lib

    with tempfile.TemporaryDirectory(prefix="pytorch_reference_") as tmp:
        work = Path(tmp)
        config_lib.dump(cfg, work / "config.yaml")
        np.savez(work / "batches.npz", inputs=batch_inputs, h=batch_h,
                 **{f"full_{b}": x for b, x in full_inputs.items()})
        (work / "timing.json").write_text(json.dumps({"min_calls": min_calls, "min_seconds": min_seconds}))
        return _common.run_for_json([sys.executable, str(Path(__file__).resolve()), str(work)], dict(env),
                                    work / "result.json", "the reference's process", timeout_s)


def _main(work: Path) -> int:
    """The subprocess side of `measure_in_subprocess`: read the work directory, measure, write result.json."""
    from chest_jax import config as config_lib

    cfg = config_lib.load(work / "config.yaml")
    timing = json.loads((work / "timing.json").read_text())
    with np.load(work / "batches.npz") as batches:
        full = {int(k.split("_")[1]): batches[k] for k in batches.files if k.startswith("full_")}
        result = measure(cfg, batches["inputs"], batches["h"], full, **timing)
    result["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")  # as this process saw it
    (work / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    # Deliberately no hostmem.use_huge_pages(): this process runs in the environment its caller chose.
    sys.exit(_main(Path(sys.argv[1])))
