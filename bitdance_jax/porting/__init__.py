"""Porting the released PyTorch checkpoints: one naming convention, one module per model family, the command line."""
