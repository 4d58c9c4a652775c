#!/usr/bin/env python
"""Port released BitDance PyTorch weights to a self-describing Orbax directory.

    python tools/port_weights.py SRC DST [--no-ema] [--tokenizer ae_d16c32.pt] [--n-head N]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bitdance_jax.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
