"""bitdance-jax: BitDance (binary-token autoregressive image generation) in JAX/Flax."""
from bitdance_jax.c2i.api import load_model
from bitdance_jax.c2i.config import BitDanceConfig
from bitdance_jax.nn.diffusion_head import DiffusionNet, HeadConfig
from bitdance_jax.porting.c2i import port_imagenet_checkpoint
from bitdance_jax.t2i.pipeline import load_t2i
from bitdance_jax.t2i.qwen3 import Qwen3Config, Qwen3ForCausalLM
from bitdance_jax.tokenizer.api import Tokenizer, load_tokenizer
from bitdance_jax.tokenizer.model import TokenizerConfig

__all__ = ["DiffusionNet", "HeadConfig", "TokenizerConfig", "Tokenizer", "load_tokenizer",
           "Qwen3Config", "Qwen3ForCausalLM", "BitDanceConfig", "load_model", "load_t2i",
           "port_imagenet_checkpoint"]
