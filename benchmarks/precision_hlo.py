"""What `training.precision: bfloat16` really computes on this backend: the dtypes of the matmuls before and after
XLA compiles the forward pass.

    python benchmarks/precision_hlo.py [--config configs/quick/base.yaml] [--json PATH]

The model emits its matmuls in bfloat16 (`compute_dtype`); a backend without fast bfloat16 arithmetic may
rewrite them. On XLA:CPU (jax 0.10.2, this project's 2-core machine) every one of the 37 dots of the preset's
forward comes out of compilation as a float32 dot on operands converted from bfloat16: the values are rounded to
bfloat16 between layers, the arithmetic is float32, and the converts make the step slower, not faster. On a
GPU the dots stay bfloat16 (tensor cores). This script prints the counts for the backend it runs on.
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
from chest_jax import hostmem  # noqa: E402
from chest_jax.model import Estimator_v4  # noqa: E402


def dot_dtypes(cfg: C.Config) -> dict:
    """{"lowered": {dtype: count}, "compiled": {dtype: count}, "converts_compiled": n} for the bf16 forward."""
    model = Estimator_v4(cfg.ch_estimation, cfg.dataset.ref_conf_dict.dmrs, rngs=nnx.Rngs(0),
                         compute_dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    x = jnp.zeros((2, 1, cfg.dataset.num_used_subcarriers, 2), jnp.float32)
    lowered = jax.jit(lambda st, inputs: nnx.merge(graphdef, st)(inputs)[0]).lower(state, x)
    before = lowered.as_text()
    after = lowered.compile().as_text()
    return {
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "lowered": dict(collections.Counter(re.findall(r"stablehlo\.dot_general.*?-> tensor<[^>]*x(\w+)>", before))),
        "compiled": dict(collections.Counter(re.findall(r"= (\w+)\[[^\]]*\](?:\{[^}]*\})? dot\(", after))),
        "converts_compiled": len(re.findall(r" convert\(", after)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/quick/base.yaml")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report = dot_dtypes(C.load(args.config))
    print(f"{report['backend']} (jax {report['jax_version']}): matmul result dtypes as emitted {report['lowered']}, "
          f"after compilation {report['compiled']}; {report['converts_compiled']} converts in the compiled forward")
    if args.json:
        _common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    hostmem.use_huge_pages()  # as every entry point does (chest_jax/hostmem.py)
    sys.exit(main())
