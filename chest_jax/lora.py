"""LoRA for `Estimator_v4`: adapter layers, injection by target name, merge, and base-model fingerprints.

Vocabulary and scaling follow PEFT: `r`, `lora_alpha`, `lora_dropout`, `target_modules`; the adapter adds
(lora_alpha / r) * dropout(x) A B to a Linear's output, A (in, r) random, B (r, out) zero, so a freshly
adapted model computes exactly what its base computes. Adapter weights are `nnx.LoRAParam`s (a subclass of
`nnx.Param`), which is how training selects them; the base `kernel` / `bias` keep their paths, so a base
checkpoint loads into an adapted model unchanged.

LoRA dropout is a training-time concern of the adapter alone: the model calls every Linear as `layer(x)`, and
`dropout_keys(model, key)` hands each adapter its own key for the duration of one call (the training step);
without it (evaluation, merged export) LoRA dropout is off.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chest_jax.config import PeftConfig
from chest_jax import trees
from chest_jax.model import Linear, dropout, matmul, torch_linear_default_init, xavier_uniform

# PEFT initialises lora_A like a torch nn.Linear weight (kaiming-uniform, a=sqrt(5)): U(+-1/sqrt(in_features)).
lora_a_init = torch_linear_default_init


class LoRALinear(Linear):
    """A `Linear` plus a low-rank update: y = x W + b + (lora_alpha / r) * dropout(x) lora_A lora_B.

    Parameters: `kernel` (in, out), `bias` (out,) as in `Linear`; `lora_A` (in, r) and `lora_B` (r, out) as
    `nnx.LoRAParam`. LoRA dropout (on the adapter's input only, never on the base path) is active only inside
    `dropout_keys` for the model holding the layer.
    """

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 *, rngs: nnx.Rngs, dtype: Any = None, kernel_init: nnx.Initializer = xavier_uniform,
                 bias_init: nnx.Initializer = jax.nn.initializers.zeros):
        if r < 1:
            raise ValueError(f"LoRA rank r={r} must be at least 1 (ch_estimation.peft.r)")
        super().__init__(in_features, out_features, dtype=dtype, kernel_init=kernel_init, bias_init=bias_init,
                         rngs=rngs)
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / r
        self.lora_dropout = float(lora_dropout)
        self.lora_A = nnx.LoRAParam(lora_a_init(rngs.params(), (in_features, r), jnp.float32))
        self.lora_B = nnx.LoRAParam(jnp.zeros((r, out_features), jnp.float32))

    @classmethod
    def from_linear(cls, linear: Linear, r: int, alpha: float, dropout: float, *, rngs: nnx.Rngs) -> "LoRALinear":
        """Wrap `linear`, keeping its kernel and bias values (only lora_A is drawn from `rngs`)."""
        if isinstance(linear, LoRALinear):
            raise ValueError("this layer already carries a LoRA adapter; merge_lora first to wrap it again")
        kernel, bias = linear.kernel[...], linear.bias[...]
        return cls(linear.in_features, linear.out_features, r, alpha, dropout, dtype=linear.dtype,
                   kernel_init=lambda *_: kernel, bias_init=lambda *_: bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        key = _DROPOUT_KEYS.get().get(id(self))
        x_lora = x if key is None else dropout(x, self.lora_dropout, key)
        delta = matmul(matmul(x_lora, self.lora_A[...], y.dtype), self.lora_B[...], y.dtype)
        return (y + delta * self.scaling).astype(y.dtype)

    def affine(self) -> tuple[jax.Array, jax.Array] | None:
        """(merged kernel, bias) while the adapter's dropout is off; None while it is on (the map then differs per
        element, so it cannot be folded into the next projection)."""
        if _DROPOUT_KEYS.get().get(id(self)) is not None:
            return None
        return self.merged_kernel(), self.bias[...]

    def merged_kernel(self) -> jax.Array:
        """kernel + (lora_alpha / r) lora_A lora_B, (in, out) float32."""
        delta = jnp.matmul(self.lora_A[...], self.lora_B[...], precision=jax.lax.Precision.HIGHEST)
        return self.kernel[...] + self.scaling * delta


def _linear_children(model: nnx.Module) -> list[tuple[str, nnx.Module, str, Linear]]:
    """(dotted path, parent module, attribute name, layer) for every Linear held as a module attribute."""
    found = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        for name, child in vars(node).items():
            if isinstance(child, Linear):
                found.append((".".join(str(p) for p in (*path, name)), node, name, child))
    return found


def apply_lora(model: nnx.Module, peft: PeftConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Replace, in place, every `Linear` whose attribute name is in `peft.target_modules` by a `LoRALinear`.

    `out_proj` matches the output projections of both `mha` and `cond_mha`. Returns the dotted paths wrapped
    (e.g. "ch_tf._layers.0.mha.out_proj"). Raises ValueError when a target matches nothing or when the model
    already has adapters.
    """
    targets = set(peft.target_modules)
    chosen = [entry for entry in _linear_children(model) if entry[2] in targets]
    already = [path for path, _, _, layer in chosen if isinstance(layer, LoRALinear)]
    if already:
        raise ValueError(f"model already has LoRA adapters on {already[:3]}{' ...' if len(already) > 3 else ''}; "
                         "apply_lora once per model (merge_lora first to stack a new adapter)")
    missing = sorted(targets - {name for _, _, name, _ in chosen})
    if missing:
        available = sorted({name for _, _, name, _ in _linear_children(model)})
        raise ValueError(f"LoRA target modules not found in the model: {missing}; "
                         f"ch_estimation.peft.target_modules must name Linear layers among {available}")
    for _, parent, name, layer in chosen:
        setattr(parent, name, LoRALinear.from_linear(layer, peft.r, peft.lora_alpha, peft.lora_dropout, rngs=rngs))
    return [path for path, _, _, _ in chosen]


def merge_lora(model: nnx.Module) -> int:
    """Fold every adapter into its kernel (kernel += (lora_alpha / r) A B) and restore plain `Linear`s, in place.

    Returns how many adapters were merged; afterwards the model holds no `nnx.LoRAParam`.
    """
    merged = 0
    for _, parent, name, layer in _linear_children(model):
        if not isinstance(layer, LoRALinear):
            continue
        kernel, bias = layer.merged_kernel(), layer.bias[...]
        plain = Linear(layer.in_features, layer.out_features, dtype=layer.dtype,
                       kernel_init=lambda *_, k=kernel: k, bias_init=lambda *_, b=bias: b, rngs=nnx.Rngs(0))
        setattr(parent, name, plain)
        merged += 1
    return merged


def lora_leaves(tree: dict) -> dict:
    """The LoRA leaves (`lora_A`, `lora_B`) of a parameter pure dict, at their paths (an adapter's content)."""
    return trees.subtree(tree, ("lora_A", "lora_B"))


def lora_layers(model: nnx.Module) -> list[LoRALinear]:
    """Every adapter of `model`, in graph order (the order `dropout_keys` numbers them in)."""
    return [layer for _, _, _, layer in _linear_children(model) if isinstance(layer, LoRALinear)]


# {id(layer): key} of the adapters dropping their input in the current call; empty outside `dropout_keys`. A
# context variable rather than a module attribute: the model's arrays stay parameters only, and nothing of a
# traced call can outlive it.
_DROPOUT_KEYS: contextvars.ContextVar[dict[int, jax.Array]] = contextvars.ContextVar("lora_dropout_keys", default={})


@contextlib.contextmanager
def dropout_keys(model: nnx.Module, key: jax.Array) -> Iterator[None]:
    """Within the block, adapter i of `model` drops its input with `fold_in(key, i)`; outside it none does.

    Meant for one (traced) call, inside the training step:
        with dropout_keys(model, lora_key):
            h_est, _ = model(inputs, deterministic=False, rngs=nnx.Rngs(dropout=model_key))
    """
    layers = lora_layers(model)
    token = _DROPOUT_KEYS.set({id(layer): jax.random.fold_in(key, i) for i, layer in enumerate(layers)})
    try:
        yield
    finally:
        _DROPOUT_KEYS.reset(token)


def params_fingerprint(pure_dict: Any) -> str:
    """SHA-256 hex digest over the sorted (path, dtype, shape, bytes) of a pure parameter dict.

    Identifies a base model exactly: an adapter records its base's fingerprint, and loading it onto another
    base can be refused. Independent of dict insertion order; any change of a value, dtype or shape changes it.
    """
    if isinstance(pure_dict, nnx.State):
        pure_dict = nnx.to_pure_dict(pure_dict)
    leaves = jax.tree_util.tree_flatten_with_path(pure_dict)[0]
    entries = sorted(((trees.path_str(path), leaf) for path, leaf in leaves), key=lambda e: e[0])
    digest = hashlib.sha256()
    for path, leaf in entries:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{path}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
