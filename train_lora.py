"""LoRA transfer from a base model: `python train_lora.py [--config FILE] [section.key=value ...]`."""
import sys

from chest_jax.train import cli

if __name__ == "__main__":
    sys.exit(cli("lora"))
