"""Train the Estimator_v4 base model from scratch: `python train_base.py [--config FILE] [section.key=value ...]`."""
import sys

from chest_jax.train import cli

if __name__ == "__main__":
    sys.exit(cli("base"))
