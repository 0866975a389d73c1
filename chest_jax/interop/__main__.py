"""`python -m chest_jax.interop ...`: see `chest_jax.interop.cli`."""
import sys

from chest_jax.interop.cli import main

sys.exit(main())
