"""Measure base vs LoRA models and the classical estimators on fixed test sets.

    python compare.py [--config configs/compare.yaml] [--models SPEC ...] [--out DIR] [section.key=value ...]

A model SPEC is a run directory, a checkpoint, or BASE+ADAPTER, optionally labelled `label=SPEC`; entries that
share a label are seeds of one model (mean and spread are reported).
"""
import sys

from chest_jax.hostmem import use_huge_pages

if __name__ == "__main__":
    use_huge_pages()  # re-executes once, before the heavy imports below (chest_jax/hostmem.py)

from chest_jax.compare import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
