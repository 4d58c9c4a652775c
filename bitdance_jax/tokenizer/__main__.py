"""python -m bitdance_jax.tokenizer: see cli.py."""
import sys

from bitdance_jax.tokenizer.cli import main

sys.exit(main())
