"""Text-to-image BitDance on a Qwen3 backbone: model, prompts, jitted sampler, pipeline and command line."""
