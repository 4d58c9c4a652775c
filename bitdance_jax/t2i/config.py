"""Text-to-image model config: the Qwen3 config, the vision-head kwargs, the tokenizer and the sizes a model accepts."""
from __future__ import annotations

import dataclasses
import math

from bitdance_jax.nn.diffusion_head import HeadConfig
from bitdance_jax.t2i.qwen3 import Qwen3Config
from bitdance_jax.tokenizer.model import TokenizerConfig

KIND = "bitdance_t2i"

# (height, width) in pixels accepted by the released 14B models: the reference's whitelist
# (IMAGE_SIZE_LIST in t2i_pipeline.py, 18 entries).
RELEASED_SIZES: tuple[tuple[int, int], ...] = (
    (2048, 512), (1920, 512), (1536, 640), (1280, 768), (1152, 896), (1024, 1024),
    (896, 1152), (768, 1280), (640, 1536), (512, 1920), (512, 2048),
    (1024, 256), (896, 256), (640, 384), (512, 512), (384, 640), (256, 896), (256, 1024))
POS_EMBED_MAX_PIXELS = 4096  # the 1-D table covers 4096 / vae_patch latent positions

@dataclasses.dataclass(frozen=True)
class T2IConfig:
    """Everything needed to rebuild the modules: the HF Qwen3 config, the reference
    ``DiffHead`` kwargs (vision_head_config.json), the tokenizer config and the sizes a
    released model accepts (``None``: any size whose latent grid splits into p x p patches)."""
    llm: Qwen3Config
    head_kwargs: dict
    tokenizer: TokenizerConfig
    supported_sizes: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        p = math.isqrt(self.parallel_num)
        if p * p != self.parallel_num:
            raise ValueError(f"parallel_num {self.parallel_num} is not a square")
        head = self.head
        if head.ch_cond != self.llm.hidden_size or head.ch_target != self.tokenizer.z_channels:
            raise ValueError(f"vision head (ch_cond {head.ch_cond}, ch_target {head.ch_target}) "
                             f"does not fit the LLM hidden size {self.llm.hidden_size} and the "
                             f"tokenizer's {self.tokenizer.z_channels} latent channels")
        if self.llm.hidden_size % 4:
            raise ValueError(f"the 2D sin-cos embedding needs hidden_size % 4 == 0, got "
                             f"{self.llm.hidden_size}")

    @property
    def head(self) -> HeadConfig:
        return HeadConfig.from_reference_kwargs(self.head_kwargs, variant="t2i")

    @property
    def parallel_num(self) -> int:
        return self.head.parallel_num

    @property
    def patch_side(self) -> int:
        return math.isqrt(self.parallel_num)

    @property
    def vae_patch_size(self) -> int:
        return self.tokenizer.downsample_factor

    def to_dict(self) -> dict:
        return {"llm": self.llm.to_dict(), "head_kwargs": dict(self.head_kwargs),
                "tokenizer": self.tokenizer.to_dict(),
                "supported_sizes": None if self.supported_sizes is None
                else [list(s) for s in self.supported_sizes]}

    @classmethod
    def from_dict(cls, d: dict) -> "T2IConfig":
        sizes = d.get("supported_sizes")
        return cls(llm=Qwen3Config(**d["llm"]), head_kwargs=dict(d["head_kwargs"]),
                   tokenizer=TokenizerConfig(**d["tokenizer"]),
                   supported_sizes=None if sizes is None else tuple(tuple(s) for s in sizes))

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) for an image size; ``ValueError`` for sizes the model cannot make."""
        if self.supported_sizes is not None and (height, width) not in self.supported_sizes:
            listed = ", ".join(f"{h}x{w}" for h, w in self.supported_sizes)
            raise ValueError(f"image size {height}x{width} (height x width) is not supported by "
                             f"this model; choose one of {listed}")
        f, p = self.vae_patch_size, self.patch_side
        if height <= 0 or width <= 0 or height % (f * p) or width % (f * p):
            raise ValueError(f"height and width must be positive multiples of {f * p} (tokenizer "
                             f"patch {f} x {p}x{p} tokens per step), got {height}x{width}")
        h, w = height // f, width // f
        if max(h, w) > POS_EMBED_MAX_PIXELS // f:
            raise ValueError(f"image size {height}x{width} exceeds the position table "
                             f"({POS_EMBED_MAX_PIXELS} pixels per side)")
        return h, w
