"""bitdance-jax: BitDance (binary-token autoregressive image generation) in JAX/Flax."""
from bitdance_jax.tokenizer import TokenizerConfig
from bitdance_jax.tokenizer_api import Tokenizer, load_tokenizer

__all__ = ["TokenizerConfig", "Tokenizer", "load_tokenizer"]
