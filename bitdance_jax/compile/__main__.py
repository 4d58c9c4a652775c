import sys

from bitdance_jax.compile import main

sys.exit(main())
