"""``python -m bitdance_jax.demo``."""
from bitdance_jax.demo import main

raise SystemExit(main())
