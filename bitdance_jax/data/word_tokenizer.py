"""Text tokenizers for T2I training: a word-level one built from the training captions (models
trained from scratch), or a pretrained LLM's extended with the T2I special tokens."""
from __future__ import annotations

from typing import Sequence

from bitdance_jax.checkpointing.atomic import atomic_write

UNK_TOKEN = "[UNK]"

def special_tokens(max_latent_side: int, parallel_num: int) -> list[str]:
    return (["<|im_start|>", "<|im_end|>", "<|vision_start|>"]
            + [f"<|res_{n}|>" for n in range(1, max_latent_side + 1)]
            + [f"<|query_{k}|>" for k in range(1, parallel_num)])


def build_word_tokenizer(path: str, texts: Sequence[str], *, max_latent_side: int,
                         parallel_num: int) -> str:
    """Write a word-level ``tokenizer.json`` over the words of ``texts`` (plus "user" and
    "assistant" of the chat template) and the T2I special tokens; id 0 is ``[UNK]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = set()
    split = pre_tokenizers.Whitespace()
    for text in list(texts) + ["user assistant"]:
        words.update(w for w, _ in split.pre_tokenize_str(text))
    specials = special_tokens(max_latent_side, parallel_num)
    vocab = {tok: i for i, tok in enumerate([UNK_TOKEN] + specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = split
    tok.add_special_tokens(specials)
    with atomic_write(path, directory=False) as tmp:
        tok.save(tmp)
    return path


def extend_text_tokenizer(src: str, dst: str, *, max_latent_side: int, parallel_num: int) -> str:
    """Write ``src`` (a pretrained LLM's ``tokenizer.json``) plus the T2I special tokens it
    lacks to ``dst``. Its own tokens keep their ids (a token it has, e.g. Qwen3's
    ``<|vision_start|>``, is reused); the new ones take the next free ids."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(src)
    missing = [t for t in special_tokens(max_latent_side, parallel_num)
               if tok.token_to_id(t) is None]
    tok.add_special_tokens(missing)
    with atomic_write(dst, directory=False) as tmp:
        tok.save(tmp)
    return dst
