"""python -m bitdance_jax.sample: the class-conditional sampling command line (bitdance_jax.c2i.cli)."""
import sys

from bitdance_jax.c2i.cli import main

if __name__ == "__main__":
    sys.exit(main())
