"""``python -m bitdance_jax.hub ID``."""
from bitdance_jax.hub import main

raise SystemExit(main())
