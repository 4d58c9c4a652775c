"""Prompt text and ids: the chat template, the unconditional prompt and the image-prefix special tokens.

The sequence is the chat-formatted prompt, ``<|vision_start|> <|res_h|> <|res_w|>``, the
``<|query_1..P-1|>`` tokens, then the image latents fed back P at a time.
"""
from __future__ import annotations

import dataclasses
import json
import os

UNCOND_PROMPT = "<|im_start|>assistant\n"
TEXT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def cond_prompt(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


@dataclasses.dataclass(frozen=True)
class PromptEntry:
    """One prompt of a prompt set: its id in the set (names its outputs), the text, and the
    source line for sets that carry per-prompt metadata (GenEval's JSONL)."""
    index: int
    id: str
    prompt: str
    metadata: str | None = None

    def __post_init__(self):
        # The id names a file in the output folder (DPG-Bench's ``<id>.png``), and benchmark
        # files are downloaded: it must be a plain name, never a path.
        bad = ("empty" if not self.id else
               "a path" if any(c in self.id for c in "/\\\0") or os.path.isabs(self.id) else
               "hidden or relative" if self.id.startswith(".") else None)
        if bad:
            raise ValueError(f"prompt id {self.id!r} is {bad}; ids must be plain file names "
                             "(no separators, no leading '.')")


def _lines(text: str) -> list[str]:
    """Lines split at newlines only (the file is read with universal newlines):
    ``str.splitlines`` also splits at U+2028, form feeds and other separators that occur
    inside prompts, which would cut one prompt in two and shift every later id."""
    return text.split("\n")


def read_prompts_file(path: str) -> list[PromptEntry]:
    """A prompt set: ``.txt`` (one prompt per non-empty line), ``.json`` (DPG-Bench's
    ``{id: prompt}``, or a list of prompts or of ``{"prompt": ...}`` objects) or ``.jsonl``
    (one ``{"prompt": ..., ...}`` object per line, GenEval's metadata form; the line is kept)."""
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts file {path} is not valid JSON: {e}") from None
        items = list(data.items()) if isinstance(data, dict) else list(enumerate(data))
        entries = []
        for i, (key, value) in enumerate(items):
            prompt = value.get("prompt") if isinstance(value, dict) else value
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompts file {path}: entry {key!r} has no prompt text")
            try:
                entries.append(PromptEntry(i, str(key), prompt.strip(),
                                           json.dumps(value) if isinstance(value, dict) else None))
            except ValueError as e:
                raise ValueError(f"prompts file {path}: {e}") from None
    elif ext == ".jsonl":
        entries = []
        for n, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object: {e}") from None
            if not isinstance(value, dict) or not isinstance(value.get("prompt"), str):
                raise ValueError(f"{path}:{n}: expected an object with a 'prompt' string")
            i = len(entries)
            entries.append(PromptEntry(i, str(i), value["prompt"].strip(), line.rstrip("\n") + "\n"))
    else:
        lines = [line.strip() for line in _lines(text) if line.strip()]
        entries = [PromptEntry(i, str(i), line) for i, line in enumerate(lines)]
    if not entries:
        raise ValueError(f"prompts file {path} holds no prompts")
    return entries


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
