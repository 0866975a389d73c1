"""What `training.precision: bfloat16` really computes on this backend: the operand and result dtypes of the
matmuls before and after XLA compiles the forward pass.

    python benchmarks/precision_hlo.py [--config configs/quick/base.yaml] [--json PATH]

The model emits its matmuls on bfloat16 operands with float32 accumulation (`chest_jax.model.matmul`); a backend
without fast bfloat16 arithmetic may rewrite them into float32 dots on converted operands. On XLA:CPU (jax
0.10.2) a bf16 x bf16 -> f32 dot stays bfloat16 (avx512_bf16 where the CPU has it), while a bf16 x bf16 -> bf16
dot, which the model emitted before, came out as a float32 dot on converted operands. This script prints the
counts for the backend it runs on, as "lhs x rhs -> result" dtypes.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (puts the repository on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from chest_jax import config as C  # noqa: E402
from chest_jax import hostmem, loading  # noqa: E402

def lowered_dots(text: str) -> dict[str, int]:
    """{"lhs x rhs -> result": count} of the stablehlo dot_generals in `text`."""
    found = re.findall(r"stablehlo\.dot_general[^\n]*: \(tensor<([^>]*)>, tensor<([^>]*)>\) -> tensor<([^>]*)>", text)
    element = lambda tensor_type: tensor_type.split("x")[-1]  # noqa: E731 - "256x128xbf16" -> "bf16"
    return dict(collections.Counter(f"{element(a)} x {element(b)} -> {element(r)}" for a, b, r in found))


def compiled_dots(text: str) -> dict[str, int]:
    """{"lhs x rhs -> result": count} of the dot instructions in compiled HLO text (fused computations included);
    operand dtypes are looked up from the instructions that define them."""
    dtype = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", text))
    found = re.findall(r"= (\w+)\[[^\]]*\](?:\{[^}]*\})? dot\(%([\w.\-]+), %([\w.\-]+)\)", text)
    return dict(collections.Counter(f"{dtype.get(a, '?')} x {dtype.get(b, '?')} -> {r}" for r, a, b in found))


def dot_dtypes(cfg: C.Config) -> dict:
    """{"lowered": {...}, "compiled": {...}, "converts_compiled": n} for the forward pass in bfloat16."""
    model = loading.new_model(loading.with_precision(cfg, "bfloat16"), jax.random.key(0))
    graphdef, state = nnx.split(model)
    x = jnp.zeros((2, 1, cfg.dataset.num_used_subcarriers, 2), jnp.float32)
    lowered = jax.jit(lambda st, inputs: nnx.merge(graphdef, st)(inputs)[0]).lower(state, x)
    after = lowered.compile().as_text()
    return {
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "lowered": lowered_dots(lowered.as_text()),
        "compiled": compiled_dots(after),
        "converts_compiled": len(re.findall(r" convert\(", after)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/quick/base.yaml")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = dot_dtypes(C.load(args.config))
    print(f"{report['backend']} (jax {report['jax_version']}): matmuls as emitted {report['lowered']}, after "
          f"compilation {report['compiled']}; {report['converts_compiled']} converts in the compiled forward")
    if args.json:
        _common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    hostmem.use_huge_pages()  # as every entry point does (chest_jax/hostmem.py)
    sys.exit(main())
