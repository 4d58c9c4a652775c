"""python -m bitdance_jax.porting: see cli.py."""
import sys

from bitdance_jax.porting.cli import main

sys.exit(main())
