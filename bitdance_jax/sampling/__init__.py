"""Sampling shared by the model families: the one next-patch loop (``next_patch``)."""
