#!/usr/bin/env python
"""Port released BitDance PyTorch weights to a self-describing Orbax directory.

    python tools/port_weights.py SRC DST [--no-ema] [--tokenizer ae_d16c32.pt]
"""
import sys

from bitdance_jax.convert import main

if __name__ == "__main__":
    sys.exit(main())
