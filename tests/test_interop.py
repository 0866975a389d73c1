"""Import/export with the PyTorch original: the real PEFT fixture, parity with a PyTorch reference, refusals."""
import dataclasses
import functools
import json
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from chest_jax import config, interop, trees
from chest_jax.interop import InteropError
from chest_jax.model import Estimator_v4, abstract_params, param_count

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("CHEST_JAX_SHARED", REPO.parent / "shared")) / "fixtures" / "peft_inf_r8"
needs_fixture = pytest.mark.skipif(not (FIXTURE / "adapter_config.json").is_file(),
                                   reason=f"PEFT fixture not found at {FIXTURE} (set CHEST_JAX_SHARED)")

# 96 used subcarriers: 8 condition tokens of width 24, but 12 query tokens of width 16, so a mix-up of the two
# token counts or encodings cannot go unnoticed.
SMALL_OVERRIDES = [
    "dataset.fft_size=128", "dataset.num_guard_subcarriers=32", "dataset.ref_conf_dict.dmrs=[0, 96, 6]",
    "ch_estimation.cond.length=96", "ch_estimation.cond.step_size=12",
    "ch_estimation.transformer.length=96", "ch_estimation.transformer.n_token=12",
    "ch_estimation.transformer.d_model=16", "ch_estimation.transformer.n_head=2",
    "ch_estimation.transformer.dim_feedforward=32", "ch_estimation.transformer.num_layers=2",
]
SMALL = config.load(None, SMALL_OVERRIDES)
DMRS = SMALL.dataset.ref_conf_dict.dmrs
PEFT_KEY = "base_model.model.ch_tf._layers.{}.{}.{}.weight"


def flat(tree, prefix=()):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def jax_model(params, cfg=SMALL.ch_estimation):
    """An Estimator_v4 holding `params`; built abstractly, since every parameter is replaced."""
    model = nnx.eval_shape(lambda: Estimator_v4(cfg, DMRS, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


@functools.partial(jax.jit, static_argnums=0)
def _h_est(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)[0]


def jax_h_est(params, x):
    # One compiled forward (cached across tests: equal configs give equal graphdefs) is several times faster on
    # CPU than the op-by-op eager call.
    graphdef, state = nnx.split(jax_model(params))
    return np.asarray(_h_est(graphdef, state, jnp.asarray(x)))


def rx_input(seed, batch=3, symbols=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, symbols, SMALL.dataset.num_used_subcarriers, 2)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The real adapter of the original


@needs_fixture
def test_fixture_adapter_maps_every_tensor():
    peft, lora = interop.load_peft_adapter(FIXTURE, config.ChEstimationConfig())
    assert (peft.r, peft.lora_alpha, peft.lora_dropout) == (8, 16.0, 0.05)
    assert set(peft.target_modules) == set(config.LORA_TARGETS)
    leaves = flat(lora)
    assert len(leaves) == 56 == len(load_file(str(FIXTURE / "adapter_model.safetensors")))
    assert sum(v.size for v in leaves.values()) == 114_688
    assert leaves[("ch_tf", "_layers", 3, "cond_mha", "out_proj", "lora_A")].shape == (128, 8)
    assert leaves[("ch_tf", "_layers", 0, "ffnn_linear1", "lora_B")].shape == (8, 1024)
    assert leaves[("ch_tf", "_layers", 0, "ffnn_linear2", "lora_A")].shape == (1024, 8)


@needs_fixture
def test_fixture_adapter_round_trips_bit_identically(tmp_path):
    peft, lora = interop.load_peft_adapter(FIXTURE)
    interop.save_peft_adapter(tmp_path / "out", peft, lora)
    original = load_file(str(FIXTURE / "adapter_model.safetensors"))
    written = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert written.keys() == original.keys()
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype and written[key].tobytes() == tensor.tobytes(), key
    peft_again, _ = interop.load_peft_adapter(tmp_path / "out")
    assert peft_again == peft
    written_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written_config["auto_mapping"]["base_model_class"] == "Estimator_v4"
    with pytest.raises(InteropError, match="already exist"):
        interop.save_peft_adapter(tmp_path / "out", peft, lora)


@needs_fixture
def test_fixture_adapter_on_default_model_has_zero_out_proj_lora_b():
    """The original's quirk: its attention bypassed the out_proj LoRA wrapper, so lora_B never trained."""
    from chest_jax.lora import apply_lora

    peft, lora = interop.load_peft_adapter(FIXTURE)

    def adapted_default_model():
        model = Estimator_v4(config.ChEstimationConfig(), rngs=nnx.Rngs(0))
        apply_lora(model, peft, rngs=nnx.Rngs(1))
        return model

    model = nnx.eval_shape(adapted_default_model)  # the LoRA leaves get real values below; the base stays abstract
    lora_state = nnx.state(model, nnx.LoRAParam)
    model_leaves = {p: v.shape for p, v in flat(nnx.to_pure_dict(lora_state)).items()}
    assert model_leaves == {p: v.shape for p, v in flat(lora).items()}
    nnx.replace_by_pure_dict(lora_state, lora)
    nnx.update(model, lora_state)

    applied = flat(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    for path, value in applied.items():
        is_out_proj_b = path[-2:] == ("out_proj", "lora_B")
        assert np.all(np.asarray(value) == 0) == is_out_proj_b, path
    assert sum(1 for p in applied if p[-2:] == ("out_proj", "lora_B")) == 8


# ---------------------------------------------------------------------------------------------
# Parity with a PyTorch reference written from SPEC.md


def reference_dims():
    tr = pytest.importorskip("torch_reference")
    t, c = SMALL.ch_estimation.transformer, SMALL.ch_estimation.cond
    return tr, tr.ReferenceDims(length=t.length, step_size=c.step_size, num_layers=t.num_layers,
                                d_model=t.d_model, n_token=t.n_token, n_head=t.n_head,
                                dim_feedforward=t.dim_feedforward, dropout=t.dropout, dmrs=tuple(DMRS))


def torch_state_dict(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def torch_h_est(module, x):
    import torch

    module.eval()
    with torch.no_grad():
        return module(torch.from_numpy(x))[0].numpy()


@pytest.mark.parametrize("version", ["v4", "v1"])
def test_imported_reference_model_matches_pytorch(version):
    pytest.importorskip("torch")
    tr, dims = reference_dims()
    reference = tr.randomize_(tr.Estimator_v4(dims) if version == "v4" else tr.Estimator(dims), seed=3)
    sd = torch_state_dict(reference)
    assert interop.state_dict_version(sd) == version
    params = interop.torch_state_dict_to_params(sd, SMALL.ch_estimation, DMRS)
    assert param_count(params) == param_count(jax_model(params))

    x = rx_input(0)
    h_torch = torch_h_est(reference, x)
    assert np.abs(h_torch).max() > 0.1
    np.testing.assert_allclose(jax_h_est(params, x), h_torch, atol=1e-5, rtol=0)


def test_exported_params_reproduce_in_pytorch():
    torch = pytest.importorskip("torch")
    tr, dims = reference_dims()
    rng = np.random.default_rng(5)
    # Random values in every leaf (biases and LayerNorm included), so each one matters.
    params = trees.unflatten({path: (rng.normal(size=spec.shape) / np.sqrt(spec.shape[0])).astype(np.float32)
                                 for path, spec in flat(abstract_params(SMALL.ch_estimation, DMRS)).items()})

    sd = interop.params_to_torch_state_dict(params, SMALL.ch_estimation, DMRS)
    reference = tr.Estimator_v4(dims)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    x = rx_input(1)
    np.testing.assert_allclose(jax_h_est(params, x), torch_h_est(reference, x), atol=1e-5, rtol=0)
    back = flat(interop.torch_state_dict_to_params(sd, SMALL.ch_estimation, DMRS))
    assert all(np.array_equal(back[p], v) for p, v in flat(params).items())


def test_reference_attention_equals_torch_multihead_attention():
    """The reference's attention is PyTorch's own MultiheadAttention, given the same weights."""
    torch = pytest.importorskip("torch")
    tr = pytest.importorskip("torch_reference")
    torch.manual_seed(0)
    ours = tr.ProjectedAttention(16, 2, kdim=24, vdim=24, dropout=0.0)
    tr.randomize_(ours, seed=1)
    theirs = torch.nn.MultiheadAttention(16, 2, kdim=24, vdim=24, batch_first=True)
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items()}, strict=True)
    q, kv = torch.randn(3, 5, 16), torch.randn(3, 7, 24)
    with torch.no_grad():
        np.testing.assert_allclose(ours(q, kv, kv).numpy(), theirs(q, kv, kv, need_weights=False)[0].numpy(),
                                   atol=1e-6)


def test_fused_in_proj_weight_and_dataparallel_prefix_are_accepted():
    pytest.importorskip("torch")
    tr, dims = reference_dims()
    sd = torch_state_dict(tr.randomize_(tr.Estimator_v4(dims), seed=4))
    expected = interop.torch_state_dict_to_params(sd, SMALL.ch_estimation, DMRS)
    fused = {}
    for key, value in sd.items():
        if ".mha.q_proj_weight" in key:
            stem = key[: -len("q_proj_weight")]
            fused[f"module.{stem}in_proj_weight"] = np.concatenate(
                [sd[f"{stem}{n}_proj_weight"] for n in "qkv"], axis=0)
        elif ".mha.k_proj_weight" not in key and ".mha.v_proj_weight" not in key:
            fused[f"module.{key}"] = value
    got = flat(interop.torch_state_dict_to_params(fused, SMALL.ch_estimation, DMRS))
    assert all(np.array_equal(got[p], v) for p, v in flat(expected).items())


def test_state_dict_files_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    tr, dims = reference_dims()
    reference = tr.randomize_(tr.Estimator_v4(dims), seed=6)
    sd = torch_state_dict(reference)
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    save_file(sd, str(tmp_path / "model.safetensors"))
    for name in ("model.pt", "model.safetensors"):
        loaded = interop.load_state_dict_file(tmp_path / name)
        assert loaded.keys() == sd.keys()
        assert all(np.array_equal(loaded[k], v) for k, v in sd.items())


# ---------------------------------------------------------------------------------------------
# Refusals


def small_v4_state_dict():
    pytest.importorskip("torch")
    tr, dims = reference_dims()
    return torch_state_dict(tr.randomize_(tr.Estimator_v4(dims), seed=7))


def test_every_state_dict_problem_is_listed_in_one_error():
    sd = small_v4_state_dict()
    sd["ch_tf._layers.0.extra.weight"] = np.zeros((2, 2), np.float32)
    del sd["ch_tf._layers.1.norm2.bias"]
    sd["ch_tf._layers.0.ffnn_linear1.weight"] = np.zeros((64, 16), np.float32)
    with pytest.raises(InteropError) as err:
        interop.torch_state_dict_to_params(sd, SMALL.ch_estimation, DMRS, source="model.pt")
    message = str(err.value)
    assert message.startswith("model.pt")
    assert "unmapped   ch_tf._layers.0.extra.weight" in message
    assert "missing    ch_tf._layers.1.norm2.bias: expected (16,)" in message
    assert "mis-shaped ch_tf._layers.0.ffnn_linear1.weight: expected (32, 16), found (64, 16)" in message
    assert "dim_feedforward=64" in message  # the fix: the config the weights imply


def test_wrong_config_is_refused_with_the_implied_config():
    sd = small_v4_state_dict()
    other = config.load(None, [*SMALL_OVERRIDES, "ch_estimation.transformer.d_model=32",
                               "ch_estimation.transformer.num_layers=3"])
    with pytest.raises(InteropError, match="d_model=16 .*num_layers=2|num_layers=2.*d_model=16"):
        interop.torch_state_dict_to_params(sd, other.ch_estimation, DMRS)


def test_non_relu_config_is_refused_both_ways():
    """The original ignored `activation` and always applied ReLU: the same weights would compute differently."""
    gelu = config.load(None, [*SMALL_OVERRIDES, "ch_estimation.transformer.activation=gelu"]).ch_estimation
    with pytest.raises(InteropError, match="activation='gelu'; set it to relu"):
        interop.torch_state_dict_to_params({}, gelu, DMRS)
    with pytest.raises(InteropError, match="activation='gelu'; set it to relu"):
        interop.params_to_torch_state_dict({}, gelu, DMRS)


def test_positional_encoding_mismatch_is_refused():
    sd = small_v4_state_dict()
    sd["ch_tf._layers.1.cond_pe"] = sd["ch_tf._layers.1.cond_pe"][:, ::-1].copy()
    with pytest.raises(InteropError, match=r"encoding   ch_tf\._layers\.1\.cond_pe: differs"):
        interop.torch_state_dict_to_params(sd, SMALL.ch_estimation, DMRS)


def test_peft_wrapped_state_dict_is_refused_with_the_fix():
    sd = {"base_model.model.ch_tf._layers.0.mha_q_proj.base_layer.weight": np.zeros((16, 16), np.float32)}
    with pytest.raises(InteropError, match="merge_and_unload"):
        interop.torch_state_dict_to_params(sd, SMALL.ch_estimation, DMRS)


def test_whole_pickled_model_is_refused_with_the_conversion(tmp_path):
    torch = pytest.importorskip("torch")
    tr, dims = reference_dims()
    torch.save(tr.Estimator_v4(dims), tmp_path / "model.pt")
    with pytest.raises(InteropError) as err:
        interop.load_state_dict_file(tmp_path / "model.pt")
    assert str(tmp_path / "model.pt") in str(err.value)
    assert interop.WHOLE_MODEL_FIX in str(err.value)


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(InteropError, match="no such file"):
        interop.load_state_dict_file(tmp_path / "absent.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(InteropError, match="unknown file type"):
        interop.load_state_dict_file(tmp_path / "weights.npz")


def test_export_refuses_lora_leaves_and_foreign_trees():
    params = {path: np.zeros(spec.shape, np.float32)
              for path, spec in flat(abstract_params(SMALL.ch_estimation, DMRS)).items()}
    with_lora = dict(params)
    with_lora[("ch_tf", "_layers", 0, "mha_q_proj", "lora_A")] = np.zeros((16, 4), np.float32)
    with pytest.raises(InteropError, match="merge_lora"):
        interop.params_to_torch_state_dict(trees.unflatten(with_lora), SMALL.ch_estimation, DMRS)
    del params[("ch_tf", "_linear", "bias")]
    with pytest.raises(InteropError, match="missing    ch_tf/_linear/bias"):
        interop.params_to_torch_state_dict(trees.unflatten(params), SMALL.ch_estimation, DMRS)


def small_adapter(tmp_path, **config_changes):
    """A PEFT directory for the SMALL model: r 2, every target, random tensors."""
    rng = np.random.default_rng(0)
    peft = config.PeftConfig(r=2, lora_alpha=4.0, lora_dropout=0.0)
    lora = {}
    for layer in range(2):
        for module in interop.LORA_MODULES:
            fan_in, fan_out = {("ffnn_linear1",): (16, 32), ("ffnn_linear2",): (32, 16)}.get(module, (16, 16))
            lora[("ch_tf", "_layers", layer, *module, "lora_A")] = rng.normal(size=(fan_in, 2)).astype(np.float32)
            lora[("ch_tf", "_layers", layer, *module, "lora_B")] = rng.normal(size=(2, fan_out)).astype(np.float32)
    with warnings.catch_warnings():  # random out_proj lora_B: the export warning is expected and tested elsewhere
        warnings.simplefilter("ignore", interop.OutProjAdapterWarning)
        directory = interop.save_peft_adapter(tmp_path / "adapter", peft, trees.unflatten(lora))
    if config_changes:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return directory


def edit_tensors(directory, edit):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.filterwarnings("ignore::chest_jax.interop.OutProjAdapterWarning")  # random out_proj: expected
def test_small_adapter_checks_against_its_config(tmp_path):
    directory = small_adapter(tmp_path)
    peft, lora = interop.load_peft_adapter(directory, SMALL.ch_estimation)
    assert peft.r == 2 and len(flat(lora)) == 28
    with pytest.raises(InteropError, match="expected .* for the config's model"):
        interop.load_peft_adapter(directory, config.ChEstimationConfig())
    one_layer = dataclasses.replace(SMALL.ch_estimation, transformer=dataclasses.replace(
        SMALL.ch_estimation.transformer, num_layers=1))
    with pytest.raises(InteropError, match=r"_layers\.1\.mha_q_proj\.lora_A\.weight: layer 1, .*num_layers=1"):
        interop.load_peft_adapter(directory, one_layer)
    three_layers = dataclasses.replace(SMALL.ch_estimation, transformer=dataclasses.replace(
        SMALL.ch_estimation.transformer, num_layers=3))
    with pytest.raises(InteropError, match=r"missing .*_layers\.2\.mha_q_proj\.lora_A"):
        interop.load_peft_adapter(directory, three_layers)


def test_adapter_with_a_stray_key_is_refused(tmp_path):
    directory = small_adapter(tmp_path)
    edit_tensors(directory, lambda t: t.update({PEFT_KEY.format(0, "norm1", "lora_A"): np.zeros((2, 16),
                                                                                                 np.float32)}))
    with pytest.raises(InteropError, match=r"unmapped   base_model\.model\.ch_tf\._layers\.0\.norm1\.lora_A"):
        interop.load_peft_adapter(directory)


def test_adapter_with_a_missing_key_is_refused(tmp_path):
    directory = small_adapter(tmp_path)
    edit_tensors(directory, lambda t: t.pop(PEFT_KEY.format(1, "cond_mha.out_proj", "lora_B")))
    with pytest.raises(InteropError, match=r"missing .*_layers\.1\.cond_mha\.out_proj\.lora_B"):
        interop.load_peft_adapter(directory)


def test_adapter_tensor_of_an_untargeted_module_is_refused(tmp_path):
    directory = small_adapter(tmp_path, target_modules=["mha_q_proj", "mha_k_proj", "mha_v_proj", "out_proj",
                                                        "ffnn_linear1"])
    with pytest.raises(InteropError, match="ffnn_linear2.lora_A.weight .*not in target_modules"):
        interop.load_peft_adapter(directory)


@pytest.mark.parametrize("option, value", [
    ("use_dora", True), ("use_rslora", True), ("bias", "lora_only"), ("rank_pattern", {"ffnn_linear1": 4}),
    ("alpha_pattern", {"out_proj": 2}), ("peft_type", "IA3"), ("target_modules", ".*proj"),
])
def test_unsupported_adapter_options_are_refused(tmp_path, option, value):
    directory = small_adapter(tmp_path, **{option: value})
    with pytest.raises(InteropError) as err:
        interop.load_peft_adapter(directory)
    assert str(directory / "adapter_config.json") in str(err.value)
    assert option in str(err.value)


def test_not_an_adapter_directory_is_refused(tmp_path):
    with pytest.raises(InteropError, match="no adapter_config.json"):
        interop.load_peft_adapter(tmp_path)


def test_save_refuses_base_parameters_and_incomplete_targets(tmp_path):
    peft = config.PeftConfig(r=2, lora_alpha=2.0, target_modules=("mha_q_proj",))
    a = np.zeros((16, 2), np.float32)
    with pytest.raises(InteropError, match="missing .*mha_q_proj/lora_B"):
        interop.save_peft_adapter(tmp_path / "a", peft, {"ch_tf": {"_layers": {0: {"mha_q_proj": {"lora_A": a}}}}})
    kernel = {"ch_tf": {"_layers": {0: {"mha_q_proj": {"lora_A": a, "lora_B": a.T, "kernel": a}}}}}
    with pytest.raises(InteropError, match="unexpected .*mha_q_proj/kernel"):
        interop.save_peft_adapter(tmp_path / "b", peft, kernel)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_bad_input_exits_with_one_line(tmp_path, capsys):
    assert interop.main([str(tmp_path / "absent.pt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(InteropError):  # --debug shows the traceback instead
        interop.main([str(tmp_path / "absent.pt"), str(tmp_path / "out"), "--debug"])


def test_cli_imports_state_dict_and_exports_it_back(tmp_path, capsys):
    pytest.importorskip("torch")
    from chest_jax import checkpoint

    sd = small_v4_state_dict()
    save_file(sd, str(tmp_path / "model.safetensors"))
    assert interop.main([str(tmp_path / "model.safetensors"), str(tmp_path / "ckpt"), *SMALL_OVERRIDES]) == 0
    assert checkpoint.read_meta(tmp_path / "ckpt")["kind"] == "base"
    assert interop.main([str(tmp_path / "ckpt"), str(tmp_path / "back.safetensors"), "--export-torch"]) == 0
    back = load_file(str(tmp_path / "back.safetensors"))
    assert back.keys() == sd.keys()
    assert all(np.array_equal(back[k], v) for k, v in sd.items() if not k.endswith("pe"))
    assert all(np.allclose(back[k], v, atol=1e-5) for k, v in sd.items() if k.endswith("pe"))
    assert "imported the v4 state dict" in capsys.readouterr().out


@needs_fixture
def test_cli_imports_fixture_adapter_and_exports_it_back(tmp_path):
    assert interop.main([str(FIXTURE), str(tmp_path / "adapter")]) == 0
    assert interop.main([str(tmp_path / "adapter"), str(tmp_path / "peft"), "--export-peft"]) == 0
    original = load_file(str(FIXTURE / "adapter_model.safetensors"))
    written = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert written.keys() == original.keys()
    assert all(written[k].tobytes() == v.tobytes() for k, v in original.items())
    peft, _ = interop.load_peft_adapter(tmp_path / "peft")
    assert dataclasses.astuple(peft)[:4] == ("LORA", 8, 16.0, 0.05)


def test_residual_variant_is_refused_both_ways():
    """The original has no LS + linear skip path: its weights would compute something else."""
    residual = config.load(None, [*SMALL_OVERRIDES, "ch_estimation.residual=add"]).ch_estimation
    with pytest.raises(InteropError, match=r"residual='add'.*\(ls_linear\).*cannot represent"):
        interop.torch_state_dict_to_params({}, residual, DMRS)
    with pytest.raises(InteropError, match=r"residual='add'.*\(ls_linear\).*cannot represent"):
        interop.params_to_torch_state_dict({}, residual, DMRS)


def test_pilot_queries_variant_is_refused_both_ways():
    pilots = config.load(None, [*SMALL_OVERRIDES, "ch_estimation.queries=pilots"]).ch_estimation
    for convert in (interop.torch_state_dict_to_params, interop.params_to_torch_state_dict):
        with pytest.raises(InteropError, match="queries='pilots'.*cannot represent"):
            convert({}, pilots, DMRS)
