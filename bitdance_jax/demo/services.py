"""The demo's services, apart from the page: a progress timer, and the class-conditional and
text-to-image services that warm and run one compiled program per request shape."""
from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import numpy as np

from bitdance_jax.demo.inputs import (DIGITS_CLASSES, IMAGENET_CLASSES, InputError,  # noqa: F401
                                      _number, _whole, class_names, parse_int_list,
                                      parse_size, size_label)

DEFAULT_MAX_PROMPT_TOKENS = 256
MAX_CHARS_PER_TOKEN = 32   # a cheap bound checked before tokenizing (a 1 MB paste)


class _Timed:
    """Runs a job in a worker thread while the caller reports progress: a fraction of the
    last duration of the same shape when known, else elapsed seconds."""

    def __init__(self):
        self.durations: dict = {}

    def run(self, key, job: Callable, report: Callable[[float | tuple, str], None], desc: str):
        box: dict = {}

        def work():
            try:
                box["out"] = job()
            except BaseException as e:  # handed to the caller's thread
                box["err"] = e
        start = time.monotonic()
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        expected = self.durations.get(key)
        while worker.is_alive():
            el = time.monotonic() - start
            if expected:
                report(min(el / expected, 0.99), f"{desc}: {el:.0f}s of about {expected:.0f}s")
            else:
                report((int(el), None), f"{desc}: {el:.0f}s")
            worker.join(0.25)
        self.durations[key] = time.monotonic() - start
        if "err" in box:
            raise box["err"]
        return box["out"]


# ----------------------------------------------------------------------------- services

class ClassConditional:
    """A loaded class-conditional model behind the page's first section."""

    def __init__(self, model, names: Sequence[str], steps: Sequence[int], max_batch: int = 4):
        self.model = model
        self.num_classes = model.config.num_classes
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        self.labels = [f"{i}: {n}" for i, n in enumerate(names)]
        self._by_name = {}
        for i, n in enumerate(names):
            self._by_name.setdefault(n.strip().lower(), i)
        self.steps = list(steps)
        self.max_batch = int(max_batch)
        self.default_cfg = max(1.0, float(model.default_cfg_scale))
        self.timer = _Timed()

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def class_id(self, choice) -> int:
        text = str(choice if choice is not None else "").strip()
        if not text:
            raise InputError("no class chosen: pick one from the list")
        head = text.split(":", 1)[0].strip()
        if head.isdigit() and int(head) < self.num_classes:
            return int(head)
        if text.lower() in self._by_name:
            return self._by_name[text.lower()]
        raise InputError(f"unknown class {text!r}: pick one from the list "
                         f"(ids 0..{self.num_classes - 1})")

    def _sample(self, class_id: int, cfg: float, seed: int, steps: int) -> np.ndarray:
        # always the padded batch: one program per (steps, guided)
        return self.model.sample([class_id] * self.max_batch, seed=seed, cfg_scale=cfg,
                                 num_sampling_steps=steps)

    def check(self, choice, cfg, seed, steps, batch) -> tuple[int, float, int, int, int]:
        cls = self.class_id(choice)
        cfg = _number(cfg, "cfg scale", 1.0, 50.0)
        seed = _whole(seed, "seed", 0, 2**31 - 1)
        steps = _whole(steps, "sampling steps", 1)
        if steps not in self.steps:
            raise InputError(f"sampling steps must be one of {self.steps}, got {steps}")
        batch = _whole(batch, "batch", 1, self.max_batch)
        return cls, cfg, seed, steps, batch

    def generate(self, choice, cfg, seed, steps, batch, report=lambda f, d: None):
        cls, cfg, seed, steps, batch = self.check(choice, cfg, seed, steps, batch)
        images = self.timer.run((steps, cfg > 1.0), lambda: self._sample(cls, cfg, seed, steps),
                                report, f"sampling {batch} image(s)")[:batch]
        from PIL import Image
        return [(Image.fromarray(a), f"{self.labels[cls]} · seed {seed} · #{i}")
                for i, a in enumerate(images)]

    def warm(self, log=print) -> None:
        for steps in self.steps:
            for cfg in (1.0, max(self.default_cfg, 1.5)):
                t = time.monotonic()
                self.timer.run((steps, cfg > 1.0), lambda: self._sample(0, cfg, 0, steps),
                               lambda f, d: None, "warm")
                log(f"[demo] class-conditional: {self.max_batch} x {self.image_size}px, "
                    f"{steps} steps, cfg {'on' if cfg > 1 else 'off'}: ready in "
                    f"{time.monotonic() - t:.1f}s")


def candidate_sizes(pipe, max_side: int = 2048, limit: int = 24) -> list[tuple[int, int]]:
    """The model's size list, or (models without one) the sizes its patching and
    ``<|res_*|>`` tokens allow, largest area first."""
    cfg = pipe.config
    if cfg.supported_sizes:
        return [tuple(s) for s in cfg.supported_sizes]
    unit = cfg.vae_patch_size * cfg.patch_side
    sides = range(unit, max_side + 1, unit)
    sizes = []
    for h in sides:
        for w in sides:
            if max(h, w) > 4 * min(h, w):
                continue
            try:
                pipe.check_size(h, w)
            except ValueError:
                continue
            sizes.append((h, w))
    sizes.sort(key=lambda s: (-s[0] * s[1], s[0] != s[1], s))
    return sizes[:limit]


class TextToImage:
    """A loaded text-to-image pipeline behind the page's second section."""

    def __init__(self, pipe, sizes: Sequence[tuple[int, int]] | None = None,
                 steps: Sequence[int] = (50,), default_guidance: float = 7.5,
                 max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS):
        from bitdance_jax.t2i.sampler import prompt_bucket
        self.pipe = pipe
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        # Every prompt is padded to one bucket, the one warmed: a longer prompt would compile
        # a new program (and keep it) on each new bucket, so it is refused instead.
        self.prompt_slots = prompt_bucket(max_prompt_tokens)
        allowed = candidate_sizes(pipe)
        if sizes:
            for s in sizes:
                pipe.check_size(*s)   # ValueError names the allowed sizes
            self.sizes = [tuple(s) for s in sizes]
        else:
            self.sizes = allowed
        if not self.sizes:
            raise ValueError("the text-to-image model allows no image size")
        square = [s for s in self.sizes if s[0] == s[1]]
        if sizes:   # the caller's first size
            self.default_size = self.sizes[0]
        else:
            self.default_size = (1024, 1024) if (1024, 1024) in self.sizes else \
                (square[0] if square else self.sizes[0])
        self.steps = list(steps)
        self.default_guidance = float(default_guidance)
        self.timer = _Timed()

    def check(self, prompt, size, guidance, seed, steps):
        prompt = str(prompt or "").strip()
        if not prompt:
            raise InputError("the prompt is empty: describe the image to generate")
        # A token is at most a few characters, so this bounds the tokenizer's work first.
        if len(prompt) > MAX_CHARS_PER_TOKEN * self.prompt_slots or \
                self.pipe.prompt_tokens(prompt) > self.prompt_slots:
            raise InputError(f"the prompt is too long: at most {self.prompt_slots} tokens "
                             "(the chat template included); shorten it")
        try:
            hw = parse_size(size)
        except ValueError as e:
            raise InputError(str(e)) from None
        if hw not in self.sizes:
            raise InputError(f"size {size!r} is not offered; choose one of "
                             f"{', '.join(size_label(s) for s in self.sizes)}")
        guidance = _number(guidance, "guidance scale", 1.0, 50.0)
        seed = _whole(seed, "seed", 0, 2**31 - 1)
        steps = _whole(steps, "sampling steps", 1)
        if steps not in self.steps:
            raise InputError(f"sampling steps must be one of {self.steps}, got {steps}")
        return prompt, hw, guidance, seed, steps

    def _generate(self, prompt, hw, guidance, seed, steps):
        return self.pipe.generate(prompt, height=hw[0], width=hw[1], num_sampling_steps=steps,
                                  guidance_scale=guidance, num_images=1, seed=seed,
                                  prompt_slots=self.prompt_slots)

    def generate(self, prompt, size, guidance, seed, steps, report=lambda f, d: None):
        prompt, hw, guidance, seed, steps = self.check(prompt, size, guidance, seed, steps)
        images = self.timer.run((hw, steps, guidance > 1.0),
                                lambda: self._generate(prompt, hw, guidance, seed, steps),
                                report, f"sampling {size_label(hw)}")
        return [(im, f"{size_label(hw)} · guidance {guidance:g} · seed {seed}") for im in images]

    def warm(self, all_sizes: bool = False, log=print) -> None:
        for hw in (self.sizes if all_sizes else [self.default_size]):
            for steps in self.steps:
                for g in (1.0, max(self.default_guidance, 1.5)):
                    t = time.monotonic()
                    self.timer.run((hw, steps, g > 1.0),
                                   lambda: self._generate("a photo", hw, g, 0, steps),
                                   lambda f, d: None, "warm")
                    log(f"[demo] text-to-image: {size_label(hw)}, {steps} steps, guidance "
                        f"{'on' if g > 1 else 'off'}: ready in {time.monotonic() - t:.1f}s")
