"""Web demo (Gradio): class-conditional sampling and text-to-image.

    python -m bitdance_jax.demo --ckpt DIR|hf:owner/name[/file][@rev] \\
        [--t2i-ckpt DIR|hf:...] [--port 7860] [--host 127.0.0.1]

* Class-conditional: class picked by name (ImageNet names for 1000-class models, "digit i"
  for 10-class models, ``--class-names FILE`` otherwise), cfg, seed, sampling steps, batch.
* Text-to-image: prompt, size from the model's allowed list, guidance, seed, steps.
* Every request shape has one compiled program, warmed before the server starts: the batch
  is always padded to ``--max-batch`` (sample i depends only on seed, i, class, cfg and steps,
  so padding changes nothing), steps come from a fixed list, and text-to-image prompts are
  padded to one bucket of ``--max-prompt-tokens`` slots (longer prompts are refused).
* Images appear in a gallery with a PNG download button each; a progress bar runs while
  sampling; bad input gets a message in the page (status box and a toast), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import traceback
from typing import Callable, Sequence

import numpy as np

DIGITS_CLASSES = 10
IMAGENET_CLASSES = 1000
DEFAULT_MAX_PROMPT_TOKENS = 256
MAX_CHARS_PER_TOKEN = 32   # a cheap bound checked before tokenizing (a 1 MB paste)


# ----------------------------------------------------------------------------- class names

def _imagenet_names() -> list[str] | None:
    """The 1000 ImageNet class names shipped with gradio (no copy kept here)."""
    try:
        import importlib.resources as resources
        path = resources.files("gradio") / "media_assets" / "data" / "imagenet_labels.json"
        names = json.loads(path.read_text(encoding="utf-8"))
    except Exception:  # not shipped by this gradio version: fall back to numbers
        return None
    return [str(n) for n in names] if len(names) == IMAGENET_CLASSES else None


def class_names(num_classes: int, names_file: str | None = None) -> list[str]:
    """One human-readable name per class id."""
    if names_file:
        with open(names_file, encoding="utf-8") as f:
            text = f.read()
        try:
            names = json.loads(text)
        except json.JSONDecodeError:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        if not isinstance(names, list) or len(names) != num_classes:
            raise ValueError(f"{names_file}: expected {num_classes} class names, got "
                             f"{len(names) if isinstance(names, list) else type(names).__name__}")
        return [str(n) for n in names]
    if num_classes == DIGITS_CLASSES:
        return [f"digit {i}" for i in range(num_classes)]
    if num_classes == IMAGENET_CLASSES and (names := _imagenet_names()):
        return names
    return [f"class {i}" for i in range(num_classes)]


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{what}: expected positive whole numbers, got {text!r}")
    return list(dict.fromkeys(values))


def parse_size(label: str) -> tuple[int, int]:
    """``"HxW"`` -> (height, width)."""
    try:
        h, w = (int(x) for x in str(label).lower().split("x"))
    except ValueError:
        raise ValueError(f"size {label!r} is not HEIGHTxWIDTH") from None
    return h, w


def size_label(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


class InputError(ValueError):
    """Something the user typed or picked that cannot be used: shown in the page."""


def _whole(value, what: str, lo: int, hi: int | None = None) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{what} is empty: enter a whole number")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise InputError(f"{what} must be a whole number, got {value!r}")
    v = int(f)
    if v < lo or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise InputError(f"{what} must be {rng}, got {v}")
    return v


def _number(value, what: str, lo: float, hi: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(f) or not lo <= f <= hi:
        raise InputError(f"{what} must be between {lo} and {hi}, got {value!r}")
    return f


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


# ----------------------------------------------------------------------------- page

def _handler(fn, gr):
    """Run ``fn``; return (images, status). Any failure becomes a message in the page."""
    def report_to(progress):
        def report(frac, desc):
            try:
                if isinstance(frac, tuple):   # duration not known yet: seconds elapsed
                    progress(frac, desc=desc, unit="s")
                else:
                    progress(frac, desc=desc)
            except Exception:  # progress is cosmetic
                pass
        return report

    def handle(*args, progress=gr.Progress()):
        t = time.monotonic()
        try:
            progress(0.0, desc="starting")
            images = fn(*args, report=report_to(progress))
        except InputError as e:
            gr.Warning(str(e))
            return gr.skip(), f"⚠ {e}"
        except Exception as e:  # never a traceback, nor a server path, in the page
            traceback.print_exc()
            msg = f"generation failed ({type(e).__name__}); the server log has the details"
            gr.Warning(msg)
            return gr.skip(), f"⚠ {msg}"
        return images, f"done: {len(images)} image(s) in {time.monotonic() - t:.1f}s"
    return handle


def build_app(c2i: ClassConditional | None = None, t2i: TextToImage | None = None,
              title: str = "BitDance (JAX)"):
    import gradio as gr
    if c2i is None and t2i is None:
        raise ValueError("nothing to serve: give a class-conditional and/or a text-to-image model")
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\nBinary-token autoregressive image generation. "
                    "Click an image to enlarge it; its download button saves a PNG.")
        if c2i is not None:
            gr.Markdown(f"## Class-conditional · {c2i.image_size}x{c2i.image_size} · "
                        f"{c2i.num_classes} classes")
            with gr.Row():
                with gr.Column(scale=1):
                    cls = gr.Dropdown(c2i.labels, value=c2i.labels[0], label="class",
                                      filterable=True, allow_custom_value=True,
                                      elem_id="c2i-class")
                    cfg = gr.Slider(1.0, 10.0, value=c2i.default_cfg, step=0.1,
                                    label="cfg scale (1 = no guidance)", elem_id="c2i-cfg")
                    seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="c2i-seed")
                    steps = gr.Dropdown(c2i.steps, value=c2i.steps[0], label="sampling steps",
                                        elem_id="c2i-steps")
                    batch = gr.Slider(1, c2i.max_batch, value=min(4, c2i.max_batch), step=1,
                                      label="batch", elem_id="c2i-batch")
                    go = gr.Button("Generate", variant="primary", elem_id="c2i-generate")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="samples", format="png", columns=4,
                                         object_fit="contain", buttons=["download", "fullscreen"],
                                         elem_id="c2i-gallery")
                    status = gr.Textbox(label="status", interactive=False, elem_id="c2i-status")
            go.click(_handler(c2i.generate, gr), [cls, cfg, seed, steps, batch],
                     [gallery, status], concurrency_id="device")
        if t2i is not None:
            gr.Markdown("## Text-to-image")
            labels = [size_label(s) for s in t2i.sizes]
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="prompt", lines=2, placeholder="a red cube on a table",
                                        elem_id="t2i-prompt")
                    size = gr.Dropdown(labels, value=size_label(t2i.default_size),
                                       label="size (height x width)", elem_id="t2i-size")
                    guidance = gr.Slider(1.0, 15.0, value=t2i.default_guidance, step=0.5,
                                         label="guidance scale", elem_id="t2i-guidance")
                    tseed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="t2i-seed")
                    tsteps = gr.Dropdown(t2i.steps, value=t2i.steps[0], label="sampling steps",
                                         elem_id="t2i-steps")
                    tgo = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                with gr.Column(scale=2):
                    tgallery = gr.Gallery(label="image", format="png", columns=2,
                                          object_fit="contain", buttons=["download", "fullscreen"],
                                          elem_id="t2i-gallery")
                    tstatus = gr.Textbox(label="status", interactive=False, elem_id="t2i-status")
            tgo.click(_handler(t2i.generate, gr), [prompt, size, guidance, tseed, tsteps],
                      [tgallery, tstatus], concurrency_id="device")
    # one generation at a time on the accelerator
    app.queue(default_concurrency_limit=1, max_size=32)
    return app


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="class-conditional model: ported directory or hf:owner/name[/file][@rev]")
    p.add_argument("--t2i-ckpt", help="text-to-image model: ported/released directory or hf:...")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on (default: local only)")
    p.add_argument("--class-names", help="JSON list or text file (one name per line)")
    p.add_argument("--c2i-steps", default="100,50", help="sampling steps offered (first = default)")
    p.add_argument("--max-batch", type=int, default=4, help="largest class-conditional batch")
    p.add_argument("--t2i-steps", default="50", help="sampling steps offered (first = default)")
    p.add_argument("--t2i-sizes", help="sizes offered, the first is the default, e.g. "
                                       "1024x1024,768x1280 (default: the model's list)")
    p.add_argument("--guidance", type=float, default=7.5, help="default text-to-image guidance")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the transformers")
    p.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS,
                   help="longest text-to-image prompt, in tokens (rounded up to a multiple of "
                        "64); every prompt runs in that one warmed program")
    p.add_argument("--warm", choices=("default", "all", "none"), default="default",
                   help="compile before serving: every class-conditional shape and the default "
                        "text-to-image size ('default'), every size too ('all'), or nothing")
    args = p.parse_args(argv)
    if not args.ckpt and not args.t2i_ckpt:
        p.error("give --ckpt (class-conditional) and/or --t2i-ckpt (text-to-image)")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import jax.numpy as jnp
        from bitdance_jax import hub
        dtype = jnp.dtype(args.dtype)
        c2i = t2i = None
        if args.ckpt:
            from bitdance_jax import load_model
            model = load_model(hub.resolve(args.ckpt), dtype=dtype)
            names = class_names(model.config.num_classes, args.class_names)
            c2i = ClassConditional(model, names, parse_int_list(args.c2i_steps, "--c2i-steps"),
                                   max_batch=args.max_batch)
        if args.t2i_ckpt:
            from bitdance_jax.t2i.pipeline import load_t2i
            pipe = load_t2i(hub.resolve(args.t2i_ckpt), dtype=dtype)
            sizes = [parse_size(s) for s in args.t2i_sizes.split(",")] if args.t2i_sizes else None
            t2i = TextToImage(pipe, sizes, parse_int_list(args.t2i_steps, "--t2i-steps"),
                              default_guidance=args.guidance,
                              max_prompt_tokens=args.max_prompt_tokens)
        if args.warm != "none":
            t0 = time.monotonic()
            if c2i is not None:
                c2i.warm()
            if t2i is not None:
                t2i.warm(all_sizes=args.warm == "all")
            print(f"[demo] warm-up done in {time.monotonic() - t0:.1f}s", flush=True)
        app = build_app(c2i, t2i)
    except (hub.HubError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    app.launch(server_name=args.host, server_port=args.port, ssr_mode=False, share=False,
               show_error=False, inbrowser=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
