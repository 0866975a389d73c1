"""Helpers for parameter pure dicts (nested dicts of arrays), shared by checkpoints, LoRA and interop.

NNX pure dicts index the layers of an `nnx.List` by int, while Orbax metadata and JSON spell those keys as digit
strings; every helper here treats the two spellings as one.
"""
from __future__ import annotations

from typing import Any, Mapping

ParamPath = tuple  # a path in a pure dict, e.g. ("ch_tf", "_layers", 0, "mha", "q_proj_weight")


def key_name(key: Any) -> str:
    """The text of one key of a `jax.tree_util` key path (DictKey, SequenceKey, GetAttrKey) or a plain key."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: ParamPath) -> str:
    """"ch_tf/_layers/0/mha/q_proj_weight" for a path tuple or a jax key path."""
    return "/".join(key_name(k) for k in path)


def _as_index(key: Any) -> Any:
    return int(key) if isinstance(key, str) and key.isdigit() else key


def int_keys(tree: Any) -> Any:
    """The same nested dict with digit-string keys turned into ints (how NNX pure dicts index layers)."""
    if isinstance(tree, Mapping):
        return {_as_index(k): int_keys(v) for k, v in tree.items()}
    return tree


def flatten(tree: Mapping, prefix: ParamPath = ()) -> dict[ParamPath, Any]:
    """{path tuple: leaf} of a nested dict, digit-string keys as ints."""
    flat: dict[ParamPath, Any] = {}
    for key, value in tree.items():
        path = prefix + (_as_index(key),)
        if isinstance(value, Mapping):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[ParamPath, Any]) -> dict:
    """The nested dict of {path tuple: leaf}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def subtree(tree: Mapping, leaf_names: tuple[str, ...]) -> dict:
    """The leaves named `leaf_names` (e.g. ("lora_A", "lora_B")) of a nested dict, keeping their paths."""
    return unflatten({p: v for p, v in flatten(tree).items() if p[-1] in leaf_names})
