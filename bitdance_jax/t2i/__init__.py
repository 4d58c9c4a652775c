"""Text-to-image BitDance on a Qwen3 backbone: model, prompts, jitted sampler, pipeline and command line."""

_LAZY = {"load_t2i": "bitdance_jax.t2i.pipeline", "T2IPipeline": "bitdance_jax.t2i.pipeline"}
__all__ = sorted(_LAZY)


def __getattr__(name):
    """``from bitdance_jax.t2i import load_t2i`` (as the README writes it), imported on first
    use so that ``bitdance_jax.t2i.config`` and friends stay light to import."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
