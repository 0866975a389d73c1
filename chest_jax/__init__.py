"""chest-jax: transformer channel estimation for 5G NR DMRS pilots, with strict LoRA transfer."""

__version__ = "0.1.0"
