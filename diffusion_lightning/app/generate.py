"""The *Generate* tab: images from an exported pipeline folder or a checkpoint under the app's root.

A source is a folder with ``model_index.json`` (what ``export`` writes) or a ``.ckpt`` (what ``fit``
writes), loaded as ``sample --pipeline`` / ``sample --ckpt`` load them
(:func:`~diffusion_lightning.modules.loading.load_pipeline_source`) and kept loaded
(:class:`PipelineCache`). The values of a request are checked by the parser of ``sample``, so a bad
value gets the error ``sample`` gives. Image ``j`` of a request draws its noise from seed
``seed + j`` (as ``sample`` does for the images of a prompt), so one image does not depend on the
batch it is drawn in, and a second source compared side by side gets the same noise.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffusion_lightning.app.paths import relative, under_root

#: Loaded pipelines kept by a :class:`PipelineCache`.
CACHE_SIZE = 4
#: Images one request may ask for.
MAX_BATCH = 16
#: Folders never searched for sources (what training writes besides checkpoints).
SKIPPED_FOLDERS = {"lightning_logs", "latents", "samples", "__pycache__", ".git"}


def list_sources(root: str | os.PathLike[str]) -> list[str]:
    """The pipeline folders (with ``model_index.json``) and ``.ckpt`` files under ``root``, relative to it."""
    base = Path(root).resolve()
    found: list[str] = []
    if not base.is_dir():
        return found
    for folder, dirs, files in os.walk(base, followlinks=False):
        if "model_index.json" in files:
            found.append(relative(base, folder))
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_FOLDERS and not d.startswith("."))
        found += [relative(base, os.path.join(folder, name)) for name in sorted(files) if name.endswith(".ckpt")]
    return sorted(found)


@dataclass
class Loaded:
    """A loaded source: its pipeline, the sampling defaults it carries and its own scheduler."""

    pipeline: Any
    defaults: dict[str, Any]
    scheduler: Any

    @property
    def spec(self) -> Any:
        from diffusion_lightning.pipelines.conditioning import condition_spec

        return self.defaults.get("condition_spec") or condition_spec(self.pipeline)


class PipelineCache:
    """Loaded pipelines by source and weights; the least recently used one goes when more than ``size`` are."""

    def __init__(self, root: str | os.PathLike[str], size: int = CACHE_SIZE, device: str = "auto") -> None:
        self.root = Path(root)
        self.size = size
        self.device = device
        self._loaded: OrderedDict[tuple[str, str], Loaded] = OrderedDict()
        self.lock = threading.RLock()

    def get(self, source: str, weights: str = "ema") -> Loaded:
        """The pipeline of ``source`` (a path under the root), loaded once.

        Raises:
            SystemExit: ``error: ...`` as ``sample`` reports a source it cannot load, or one outside the root.
        """
        from jsonargparse import Namespace

        from diffusion_lightning.commands.common import load_pipeline
        from diffusion_lightning.utils.device import resolve_device

        if not source:
            raise SystemExit("error: choose a pipeline folder or a checkpoint first.")
        try:
            path = under_root(self.root, source, "source")
        except ValueError as error:
            raise SystemExit(f"error: {error}") from error
        key = (os.fspath(path), weights)
        with self.lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            is_ckpt = path.is_file()
            args = Namespace(
                ckpt=os.fspath(path) if is_ckpt else None,
                pipeline=None if is_ckpt else os.fspath(path),
                weights=weights,
                scheduler=None,
            )
            pipeline, defaults = load_pipeline(args)
            pipeline.to(resolve_device(self.device))
            pipeline.set_progress_bar_config(disable=True)
            loaded = Loaded(pipeline, defaults, pipeline.scheduler)
            self._loaded[key] = loaded
            while len(self._loaded) > self.size:
                self._loaded.popitem(last=False)
            return loaded


@dataclass
class Request:
    """What one generation asks for (the values of the tab's controls).

    Args:
        source: Pipeline folder or ``.ckpt`` under the root.
        class_index: Class of a class-conditioned model.
        prompt: Prompt of a text-to-image model.
        negative_prompt: Its negative prompt (empty: none).
        guidance_scale: Classifier-free guidance scale; ``None``: the model's.
        steps: Denoising steps; ``None``: the model's.
        scheduler: Sampler name (``schedulers.SCHEDULERS``); empty or ``None``: the pipeline's own.
        seed: Seed of image 0; image ``j`` uses ``seed + j``.
        batch_size: Number of images.
        init_image: Image-to-image: path of the starting image (text-to-image models only).
        strength: Image-to-image: how much of the image to noise away, in (0, 1].
        weights: With a ``.ckpt``: ``ema`` or ``raw`` weights.
    """

    source: str
    class_index: int | None = None
    prompt: str = ""
    negative_prompt: str = ""
    guidance_scale: float | None = None
    steps: int | None = None
    scheduler: str | None = None
    seed: int = 0
    batch_size: int = 1
    init_image: str | None = None
    strength: float | None = None
    weights: str = "ema"


@dataclass
class Result:
    """Generated images, their captions and the seconds each image took."""

    images: list[Any]
    captions: list[str]
    seconds_per_image: float
    tensors: torch.Tensor


def _as_int(value: Any, name: str) -> int | None:
    """A whole number from a UI field (``None`` or empty stays ``None``)."""
    if value is None or value == "":
        return None
    number = float(value)
    if not number.is_integer():
        raise SystemExit(f"error: --{name}={value} must be a whole number.")
    return int(number)


def parse_request(request: Request, kind: str) -> Any:
    """The request as ``sample`` options, checked by ``sample``'s parser and checks (the same errors).

    Raises:
        SystemExit: ``error: ...``, the message ``sample`` gives for the same values.
    """
    from diffusion_lightning.commands import sample

    argv = ["--pipeline", request.source, "--seed", str(_as_int(request.seed, "seed") or 0)]
    batch = _as_int(request.batch_size, "batch-size")
    argv += ["--n-per-class", str(1 if batch is None else batch)]
    steps = _as_int(request.steps, "steps")
    if steps is not None:
        argv += ["--steps", str(steps)]
    if request.guidance_scale is not None and request.guidance_scale != "":
        argv += ["--guidance-scale", str(float(request.guidance_scale))]
    if request.scheduler:
        argv += ["--scheduler", request.scheduler]
    if kind == "prompt":
        argv += ["--prompt", request.prompt or ""]
        if request.negative_prompt:
            argv += ["--negative-prompt", request.negative_prompt]
        if request.init_image:
            argv += ["--image", request.init_image]
            if request.strength is not None:
                argv += ["--strength", str(float(request.strength))]
    elif request.class_index is not None:
        argv += ["--classes", str(_as_int(request.class_index, "classes"))]
    args = sample.build_parser().parse_args(argv)
    if args.n_per_class < 1 or args.n_per_class > MAX_BATCH:
        raise SystemExit(f"error: --n-per-class={args.n_per_class} must be in 1..{MAX_BATCH} here.")
    if kind == "prompt":
        sample._check_text_arguments(args)
    return args


def generate(cache: PipelineCache, request: Request) -> Result:
    """Generate the images of ``request``.

    Raises:
        SystemExit: ``error: ...`` for a value or a source that ``sample`` would refuse.
    """
    loaded = cache.get(request.source, request.weights)
    spec = loaded.spec
    args = parse_request(request, spec.kind)
    with cache.lock:
        pipeline = loaded.pipeline
        pipeline.scheduler = _scheduler(loaded, args.scheduler)
        steps = args.num_inference_steps or loaded.defaults["steps"]
        guidance = loaded.defaults["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
        seeds = [args.seed + j for j in range(args.n_per_class)]
        start = time.perf_counter()
        try:
            if spec.kind == "prompt":
                images = _generate_text(pipeline, args, loaded.defaults, steps, guidance, seeds)
                label = args.prompt[0]
            else:
                if args.classes is None:
                    raise SystemExit("error: choose a class.")
                (index,) = args.classes
                labels = pipeline.class_label_tensor([index] * len(seeds))
                output = pipeline(
                    class_labels=labels,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=[torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
                    output_type="pt",
                )
                images = output.images.float().cpu()
                label = spec.class_name(index)
        except ValueError as error:  # the pipeline's own checks of a value (steps, guidance, class)
            raise SystemExit(f"error: {error}") from error
        finally:
            pipeline.scheduler = loaded.scheduler
        seconds = (time.perf_counter() - start) / len(seeds)
    from diffusion_lightning.utils.images import to_pil

    return Result(
        images=[to_pil(image) for image in images],
        captions=[f"{label} (seed {seed})" for seed in seeds],
        seconds_per_image=seconds,
        tensors=images,
    )


def _scheduler(loaded: Loaded, name: str | None) -> Any:
    """The pipeline's own scheduler, or the sampler ``name`` on its noise schedule."""
    if not name:
        return loaded.scheduler
    from diffusion_lightning.schedulers import make_scheduler

    try:
        return make_scheduler(name, loaded.scheduler.config)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error


def _generate_text(
    pipeline: Any, args: Any, defaults: dict[str, Any], steps: int, guidance: float, seeds: Sequence[int]
) -> torch.Tensor:
    """A text-to-image (or, with an init image, image-to-image) pipeline's images, ``(B, C, H, W)``."""
    from diffusion_lightning.commands import sample

    prompts, negatives = sample._prompt_lists(args)
    height, width = sample._image_size(args, pipeline, defaults)
    extra: dict[str, Any] = {"height": height, "width": width}
    if args.image is not None:
        strength = sample.DEFAULT_STRENGTH if args.strength is None else args.strength
        if int(steps * strength) < 1:
            raise SystemExit(
                f"error: --strength={strength} with {steps} steps leaves no denoising step (int(steps * strength) "
                "= 0); raise --strength or --steps."
            )
        extra = {"image": sample._load_image(args.image, height, width), "strength": strength}
    variant = sample._text_variant(pipeline, image_to_image=args.image is not None)
    output = variant(
        prompt=[prompts[0]] * len(seeds),
        negative_prompt=[negatives[0]] * len(seeds) if negatives is not None else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
        output_type="pt",
        **extra,
    )
    return output.images.float().cpu()


# ---------------------------------------------------------------------- the tab


def build_tab(root: str | os.PathLike[str], cache: PipelineCache) -> None:
    """The *Generate* tab's components and events (inside a ``gr.Blocks``)."""
    import gradio as gr

    from diffusion_lightning.schedulers import SCHEDULERS

    def sources_update() -> Any:
        return gr.update(choices=list_sources(root))

    def compare_update() -> Any:
        return gr.update(choices=["", *list_sources(root)])

    def describe(source: str, weights: str) -> tuple[Any, ...]:
        if not source:
            return (gr.update(), gr.update(visible=False), gr.update(visible=False), *[gr.update()] * 4)
        try:
            loaded = cache.get(source, weights)
        except SystemExit as error:
            raise gr.Error(str(error)) from None
        spec = loaded.spec
        text = spec.kind == "prompt"
        classes = gr.update(
            choices=[(spec.class_name(i), i) for i in range(spec.num_classes or 0)], value=None if text else 0
        )
        note = (
            f"**{type(loaded.pipeline).__name__}** ({'text-to-image' if text else f'{spec.num_classes} classes'}); "
            f"defaults: {loaded.defaults['steps']} steps, guidance {loaded.defaults['guidance_scale']}, "
            f"sampler {type(loaded.scheduler).__name__}."
        )
        prompt = gr.update(value=spec.default_prompts[0]) if text and spec.default_prompts else gr.update()
        guidance = gr.update(value=loaded.defaults["guidance_scale"])
        steps = gr.update(value=loaded.defaults["steps"])
        return classes, gr.update(visible=not text), gr.update(visible=text), prompt, note, guidance, steps

    def run(
        source: str,
        compare: str,
        weights: str,
        class_index: Any,
        prompt: str,
        negative: str,
        init_image: str | None,
        strength: float,
        guidance: Any,
        steps: Any,
        scheduler: str,
        seed: Any,
        batch: Any,
    ) -> tuple[Any, Any, str]:
        values = dict(
            class_index=class_index,
            prompt=prompt,
            negative_prompt=negative,
            guidance_scale=guidance,
            steps=steps,
            scheduler=scheduler or None,
            seed=seed,
            batch_size=batch,
            init_image=init_image or None,
            strength=strength if init_image else None,
            weights=weights,
        )
        lines = []
        galleries = []
        for name in (source, compare):
            if not name:
                galleries.append(gr.update(value=None, visible=name is source))
                continue
            try:
                result = generate(cache, Request(source=name, **values))
            except SystemExit as error:
                raise gr.Error(str(error)) from None
            galleries.append(gr.update(value=list(zip(result.images, result.captions)), visible=True, label=name))
            lines.append(f"{name}: {result.seconds_per_image:.3f} s per image")
        return galleries[0], galleries[1], "  \n".join(lines)

    with gr.Row():
        source = gr.Dropdown(
            choices=list_sources(root), value=None, label="Pipeline or checkpoint", elem_id="gen-source", scale=4
        )
        compare = gr.Dropdown(
            choices=["", *list_sources(root)], value="", label="Compare with (same seed)", elem_id="gen-compare",
            scale=4,
        )  # fmt: skip
        weights = gr.Radio(["ema", "raw"], value="ema", label="Checkpoint weights", elem_id="gen-weights", scale=1)
        refresh = gr.Button("Refresh list", elem_id="gen-refresh", scale=1)
    info = gr.Markdown("", elem_id="gen-model-info")
    with gr.Group(visible=False) as class_group:
        class_index = gr.Radio(choices=[], label="Class", elem_id="gen-class")
    with gr.Group(visible=False) as text_group:
        prompt = gr.Textbox(label="Prompt", elem_id="gen-prompt")
        negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
        with gr.Row():
            init_image = gr.Image(type="filepath", label="Init image (image-to-image)", elem_id="gen-init-image")
            strength = gr.Slider(0.01, 1.0, value=0.75, step=0.01, label="Strength", elem_id="gen-strength")
    with gr.Row():
        guidance = gr.Number(value=2.0, label="Guidance scale (1: none)", elem_id="gen-guidance")
        steps = gr.Number(value=25, precision=0, label="Steps", elem_id="gen-steps")
        scheduler = gr.Dropdown(
            choices=[("pipeline's own", ""), *[(name, name) for name in sorted(SCHEDULERS)]],
            value="",
            label="Sampler",
            elem_id="gen-scheduler",
        )
        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="gen-seed")
        batch = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Images", elem_id="gen-batch")
    button = gr.Button("Generate", variant="primary", elem_id="gen-run")
    timing = gr.Markdown("", elem_id="gen-timing")
    with gr.Row():
        shown = dict(format="png", columns=4, fit_columns=False, height=360, object_fit="contain")
        gallery_a = gr.Gallery(label="Images", elem_id="gen-gallery-a", **shown)
        gallery_b = gr.Gallery(label="Compared", visible=False, elem_id="gen-gallery-b", **shown)

    refresh.click(sources_update, outputs=source).then(compare_update, outputs=compare)
    outputs = [class_index, class_group, text_group, prompt, info, guidance, steps]
    source.change(describe, inputs=[source, weights], outputs=outputs)
    weights.change(describe, inputs=[source, weights], outputs=outputs)
    button.click(
        run,
        inputs=[source, compare, weights, class_index, prompt, negative, init_image, strength, guidance, steps,
                scheduler, seed, batch],
        outputs=[gallery_a, gallery_b, timing],
    )  # fmt: skip
