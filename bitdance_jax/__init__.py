"""bitdance-jax: BitDance (binary-token autoregressive image generation) in JAX/Flax."""
from bitdance_jax.diffusion_head import DiffusionNet, HeadConfig
from bitdance_jax.model import BitDanceConfig
from bitdance_jax.model_api import load_model, port_imagenet_checkpoint
from bitdance_jax.qwen3 import Qwen3Config, Qwen3ForCausalLM
from bitdance_jax.tokenizer import TokenizerConfig
from bitdance_jax.tokenizer_api import Tokenizer, load_tokenizer

__all__ = ["DiffusionNet", "HeadConfig", "TokenizerConfig", "Tokenizer", "load_tokenizer",
           "Qwen3Config", "Qwen3ForCausalLM", "BitDanceConfig", "load_model",
           "port_imagenet_checkpoint"]
