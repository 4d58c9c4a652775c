"""Prompt text and ids: the chat template, the unconditional prompt and the image-prefix special tokens.

The sequence is the chat-formatted prompt, ``<|vision_start|> <|res_h|> <|res_w|>``, the
``<|query_1..P-1|>`` tokens, then the image latents fed back P at a time.
"""
from __future__ import annotations

import os

UNCOND_PROMPT = "<|im_start|>assistant\n"
TEXT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def cond_prompt(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def read_prompts_file(path: str) -> list[str]:
    """One prompt per non-empty line (the DPG-Bench / GenEval prompt-list form)."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} holds no prompts")
    return prompts

class TextTokenizer:
    """The folder's ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTokenizer
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing text tokenizer file {path}")
        self.path = path
        self._tok = _HFTokenizer.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def has_token(self, token: str) -> bool:
        return self._tok.token_to_id(token) is not None

    def token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"the text tokenizer has no token {token!r}")
        return tid

    def image_prefix_ids(self, h: int, w: int, parallel_num: int) -> list[int]:
        """[<|vision_start|>, <|res_h|>, <|res_w|>, <|query_1|> .. <|query_{P-1}|>]."""
        try:
            res = [self.token_id(f"<|res_{h}|>"), self.token_id(f"<|res_{w}|>")]
        except ValueError as e:
            raise ValueError(f"latent grid {h}x{w} has no resolution token in this model's "
                             f"vocabulary ({e})") from None
        return ([self.token_id("<|vision_start|>")] + res
                + [self.token_id(f"<|query_{i}|>") for i in range(1, parallel_num)])
