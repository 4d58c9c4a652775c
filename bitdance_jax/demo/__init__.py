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
import os
import sys
import time
import traceback

import numpy as np

from bitdance_jax.demo.services import (DEFAULT_MAX_PROMPT_TOKENS, DIGITS_CLASSES,  # noqa: F401
                                        IMAGENET_CLASSES, MAX_CHARS_PER_TOKEN, ClassConditional,
                                        InputError, TextToImage, candidate_sizes, class_names,
                                        parse_int_list, parse_size, size_label)


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
    p.add_argument("--quantize", choices=("int8", "fp8"), default=None,
                   help="weight-only quantized kernels (a --quantize port loads as stored)")
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
            model = load_model(hub.resolve(args.ckpt, quantize=args.quantize), dtype=dtype,
                               quantize=args.quantize)
            names = class_names(model.config.num_classes, args.class_names)
            c2i = ClassConditional(model, names, parse_int_list(args.c2i_steps, "--c2i-steps"),
                                   max_batch=args.max_batch)
        if args.t2i_ckpt:
            from bitdance_jax.t2i.pipeline import load_t2i
            pipe = load_t2i(hub.resolve(args.t2i_ckpt, quantize=args.quantize), dtype=dtype,
                            quantize=args.quantize)
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

