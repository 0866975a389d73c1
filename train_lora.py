"""LoRA transfer from a base model: `python train_lora.py [--config FILE] [section.key=value ...]`."""
import sys

from chest_jax.hostmem import use_huge_pages

if __name__ == "__main__":
    use_huge_pages()  # re-executes once, before the heavy imports below (chest_jax/hostmem.py)

from chest_jax.train import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli("lora"))
