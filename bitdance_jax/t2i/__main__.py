"""python -m bitdance_jax.t2i: see cli.py."""
import sys

from bitdance_jax.t2i.cli import main

sys.exit(main())
