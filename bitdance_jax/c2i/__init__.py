"""Class-conditional BitDance (ImageNet B/L/H): backbone, jitted sampler, loading and command line."""
