"""Train the Estimator_v4 base model from scratch: `python train_base.py [--config FILE] [section.key=value ...]`."""
import sys

from chest_jax.hostmem import use_huge_pages

if __name__ == "__main__":
    use_huge_pages()  # re-executes once, before the heavy imports below (chest_jax/hostmem.py)

from chest_jax.train import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli("base"))
