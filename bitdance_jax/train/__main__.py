"""python -m bitdance_jax.train: see cli.py."""
import sys

from bitdance_jax.train.cli import main

sys.exit(main())
