"""``diffusion-lightning sample``: a labelled grid plus one PNG per image.

Class-conditioned pipelines draw ``--n-per-class`` images of each class; text-to-image pipelines
(Stable Diffusion) draw ``--n-per-prompt`` images of each ``--prompt``, or transform an ``--image``
(image-to-image) when one is given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace

from diffusion_lightning.commands.common import (
    CommandParser,
    PipelineSource,
    SamplingOptions,
    add_dataclass_flags,
    flag_name,
    load_pipeline,
)
from diffusion_lightning.pipelines.conditioning import condition_spec
from diffusion_lightning.schedulers import scheduler_name
from diffusion_lightning.utils.device import resolve_device
from diffusion_lightning.utils.images import label_grid, make_grid, save_images, to_pil
from diffusion_lightning.utils.io import write_json

#: Images per class / per prompt when ``--n-per-class`` / ``--n-per-prompt`` is not given.
DEFAULT_N_PER_CLASS = 8
DEFAULT_N_PER_PROMPT = 4
DEFAULT_STRENGTH = 0.75
#: Grid row labels are prompts cut to this many characters.
LABEL_CHARS = 40


@dataclass
class SampleArguments(PipelineSource):
    """What ``sample`` draws and where it writes it.

    Args:
        out: Output folder.
        classes: Classes to draw, one grid row each (default: all).
        n_per_class: Images per class (default: 8), or per prompt of a text-to-image pipeline (default: 4;
            image j of prompt i uses seed SEED + i * N + j).
        batch_size: Images per forward (default: all at once).
        scale: Upscaling of the grid image (default: 2 for class grids; for prompt grids enough to make rows
            ~256 px).
        images: Write one PNG per image besides the grid.
    """

    out: str = "outputs/samples"
    classes: list[int] | None = None
    n_per_class: int | None = field(
        default=None, metadata={"flags": ("--n-per-class", "--n-per-prompt", "--n_per_prompt"), "metavar": "N"}
    )
    batch_size: int | None = None
    scale: int | None = None
    images: bool = True


@dataclass
class TextToImageOptions:
    """Options that only text-to-image pipelines (Stable Diffusion) accept.

    Args:
        prompt: Prompts, one grid row each (required with a text-to-image pipeline).
        negative_prompt: One negative prompt for all prompts, or one per prompt (needs --guidance-scale > 1).
        height: Image height in pixels (default: the model's image size).
        width: Image width in pixels (default: the model's image size).
        image: Image-to-image: start from this image (resized to HxW).
        strength: Image-to-image: how much of --image to noise away, in (0, 1] (default: 0.75).
        attention_slicing: Compute attention in slices (less memory, a little slower).
        vae_slicing: Decode the batch one image at a time (less memory).
        vae_tiling: Encode/decode large images in tiles (less memory).
        cpu_offload: Keep each model on the CPU until it runs (model CPU offload; needs a CUDA GPU).
        compile: torch.compile the UNet or transformer (slow start, faster steps).
    """

    prompt: list[str] | None = field(default=None, metadata={"metavar": "TEXT"})
    negative_prompt: list[str] | None = field(default=None, metadata={"metavar": "TEXT"})
    height: int | None = None
    width: int | None = None
    image: str | None = field(default=None, metadata={"metavar": "PATH"})
    strength: float | None = None
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    compile: bool = False


#: Options that only text-to-image pipelines accept (field, flag).
TEXT_ONLY = tuple((item.name, flag_name(item.name)) for item in fields(TextToImageOptions))


def build_parser() -> CommandParser:
    """The ``sample`` parser: :class:`SampleArguments`, :class:`SamplingOptions` and :class:`TextToImageOptions`."""
    parser = CommandParser(
        prog="diffusion-lightning sample",
        description="Generate images from a checkpoint or an exported pipeline. Class-conditioned models: n images "
        "of each class, OUT/samples.png (one labelled row per class), OUT/class=<c>/sample=<i>.png. "
        "Text-to-image models (Stable Diffusion): n images of each --prompt (or variations of an --image), "
        "OUT/samples.png (one labelled row per prompt), OUT/prompt=<i>/sample=<j>.png. Both write OUT/samples.json.",
    )
    add_dataclass_flags(parser, SampleArguments)
    add_dataclass_flags(parser, SamplingOptions)
    add_dataclass_flags(parser, TextToImageOptions, title="text-to-image pipelines (Stable Diffusion)")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.n_per_class is not None and args.n_per_class < 1:
        raise SystemExit(f"error: --n-per-class/--n-per-prompt={args.n_per_class} must be >= 1.")
    _check_text_arguments(args)
    pipeline, defaults = load_pipeline(args)
    if (defaults.get("condition_spec") or condition_spec(pipeline)).kind == "prompt":
        return sample_text(args, pipeline, defaults)
    given = [flag for dest, flag in TEXT_ONLY if getattr(args, dest) not in (None, False)]
    if given:
        raise SystemExit(
            f"error: {', '.join(given)} apply to text-to-image pipelines; {args.ckpt or args.pipeline} is a "
            f"{type(pipeline).__name__} (use --classes and --n-per-class)."
        )
    return sample_classes(args, pipeline, defaults)


def sample_classes(args: Namespace, pipeline: Any, defaults: dict[str, Any]) -> Path:
    """A class-conditioned pipeline: one grid row of ``--n-per-class`` images per class."""
    n_per_class = DEFAULT_N_PER_CLASS if args.n_per_class is None else args.n_per_class
    device = resolve_device(args.device)
    pipeline.to(device)
    steps = args.num_inference_steps or defaults["steps"]
    guidance = defaults["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    start = time.perf_counter()
    grid = pipeline.generate_grid(
        num_per_class=n_per_class,
        classes=args.classes,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        batch_size=args.batch_size,
        scale=2 if args.scale is None else args.scale,
    )
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid.pil_grid.save(out / "samples.png")
    if args.images:
        save_images(grid.images, grid.class_labels, out, prefix="class")
    write_json(
        out / "samples.json",
        {
            "source": args.ckpt or args.pipeline,
            "weights": args.weights if args.ckpt else None,
            "scheduler": scheduler_name(pipeline.scheduler),
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "seed": args.seed,
            "classes": sorted(set(grid.class_labels.tolist())),
            "n_per_class": n_per_class,
            "seconds": round(seconds, 3),
            "device": str(device),
        },
    )
    print(f"wrote {out / 'samples.png'} ({grid.images.shape[0]} images, {seconds:.1f} s)")
    return out


# ---------------------------------------------------------------------- text-to-image


def _check_text_arguments(args: Namespace) -> None:
    """Checks of the text-to-image options that need no model (so they fail before any loading)."""
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise SystemExit(f"error: --strength={args.strength} must be in (0, 1].")
    if args.strength is not None and args.image is None:
        raise SystemExit("error: --strength applies to image-to-image; give --image PATH too.")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')}={value} must be >= 1.")
    if args.image is not None and not Path(args.image).is_file():
        raise SystemExit(f"error: --image {args.image!r} does not exist or is not a file.")
    if args.cpu_offload and not torch.cuda.is_available():
        raise SystemExit(
            "error: --cpu-offload (model CPU offload) needs a CUDA GPU, and none is available here; "
            "drop --cpu-offload to sample on the CPU."
        )


def _load_image(path: str, height: int, width: int) -> Any:
    """``path`` as an RGB PIL image of ``width`` x ``height``, with a clear error for unreadable files."""
    import PIL.Image

    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB").resize((width, height), PIL.Image.BICUBIC)
    except (OSError, ValueError) as error:  # missing, unreadable or not an image (PIL.UnidentifiedImageError)
        raise SystemExit(f"error: --image {path!r} could not be read as an image ({error}).") from error


def _text_variant(pipeline: Any, image_to_image: bool) -> Any:
    """The text-to-image or image-to-image pipeline over the same components (nothing is reloaded)."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    wanted = StableDiffusionImg2ImgPipeline if image_to_image else StableDiffusionPipeline
    if type(pipeline) is wanted:
        return pipeline
    if isinstance(pipeline, (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline)):
        requires = bool(getattr(pipeline.config, "requires_safety_checker", False))
        return wanted(**pipeline.components, requires_safety_checker=requires)
    if not image_to_image:
        return pipeline
    from diffusers import AutoPipelineForImage2Image

    try:
        return AutoPipelineForImage2Image.from_pipe(pipeline)
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(
            f"error: --image: {type(pipeline).__name__} has no image-to-image counterpart in diffusers ({error})."
        ) from error


def _prompt_lists(args: Namespace) -> tuple[list[str], list[str] | None]:
    if not args.prompt:
        source = args.ckpt or args.pipeline
        raise SystemExit(f'error: {source} is a text-to-image pipeline; give --prompt "TEXT" [TEXT ...].')
    prompts = list(args.prompt)
    negatives = list(args.negative_prompt) if args.negative_prompt else None
    if negatives is not None and len(negatives) not in (1, len(prompts)):
        raise SystemExit(
            f"error: --negative-prompt has {len(negatives)} entries for {len(prompts)} --prompt entries; "
            f"give 1 (for all prompts) or {len(prompts)} (one per prompt)."
        )
    if negatives is not None and len(negatives) == 1:
        negatives = negatives * len(prompts)
    return prompts, negatives


def _image_size(args: Namespace, pipeline: Any, defaults: dict[str, Any]) -> tuple[int, int]:
    """``(height, width)``: the flags, else the module's image size, else the UNet's sample size in pixels.

    A transformer pipeline (Flux) has no UNet: its ``default_sample_size`` is the latent size it defaults to.
    """
    scale = int(getattr(pipeline, "vae_scale_factor", 8))
    unet = getattr(pipeline, "unet", None)
    sample_size = unet.config.sample_size if unet is not None else pipeline.default_sample_size
    default = defaults.get("image_size") or int(sample_size) * scale
    height, width = args.height or default, args.width or default
    for name, value in (("height", height), ("width", width)):
        if value % scale:
            raise SystemExit(
                f"error: --{name}={value} must be a multiple of the VAE's downsampling factor {scale} "
                f"(e.g. {max(scale, value // scale * scale)})."
            )
    return height, width


def _configure(pipeline: Any, args: Namespace, device: torch.device) -> None:
    """Memory and speed options, then the device (or model CPU offload)."""
    if args.attention_slicing:
        pipeline.enable_attention_slicing()
    if args.vae_slicing:
        pipeline.vae.enable_slicing()
    if args.vae_tiling:
        pipeline.vae.enable_tiling()
    if args.compile:
        # in place: the pipeline keeps its denoiser (a UNet, or a Flux / SD3 transformer)
        (getattr(pipeline, "unet", None) or pipeline.transformer).compile()
    if args.cpu_offload:
        pipeline.enable_model_cpu_offload(device=device if device.type == "cuda" else "cuda")
    else:
        pipeline.to(device)


def sample_text(args: Namespace, pipeline: Any, defaults: dict[str, Any]) -> Path:
    """A text-to-image pipeline: one grid row of ``--n-per-prompt`` images per prompt (or image-to-image)."""
    if args.classes:
        raise SystemExit(f"error: --classes applies to class-conditioned pipelines; {type(pipeline).__name__} "
                         "takes --prompt.")  # fmt: skip
    prompts, negatives = _prompt_lists(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f"error: --batch-size={args.batch_size} must be >= 1.")
    n = DEFAULT_N_PER_PROMPT if args.n_per_class is None else args.n_per_class
    steps = args.num_inference_steps or defaults["steps"]
    guidance = defaults["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    height, width = _image_size(args, pipeline, defaults)
    strength = None
    extra: dict[str, Any] = {}
    if args.image is not None:
        strength = DEFAULT_STRENGTH if args.strength is None else args.strength
        if int(steps * strength) < 1:
            raise SystemExit(
                f"error: --strength={strength} with {steps} steps leaves no denoising step (int(steps * strength) "
                "= 0); raise --strength or --steps."
            )
        extra = {"image": _load_image(args.image, height, width), "strength": strength}
    if negatives is not None and guidance <= 1:
        print(f"note: --negative-prompt has no effect with --guidance-scale={guidance} (needs > 1).")
    device = resolve_device(args.device)
    pipeline = _text_variant(pipeline, image_to_image=args.image is not None)
    _configure(pipeline, args, device)

    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
    batch_size = args.batch_size or len(jobs)
    chunks = []
    start = time.perf_counter()
    for first in range(0, len(jobs), batch_size):
        batch = jobs[first : first + batch_size]
        output = pipeline(
            prompt=[prompts[i] for i, _ in batch],
            negative_prompt=[negatives[i] for i, _ in batch] if negatives is not None else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator(device="cpu").manual_seed(args.seed + i * n + j) for i, j in batch],
            output_type="pt",
            **({"height": height, "width": width} if args.image is None else {}),
            **extra,
        )
        chunks.append(output.images.float().cpu())
    seconds = time.perf_counter() - start
    images = torch.cat(chunks)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [prompt if len(prompt) <= LABEL_CHARS else prompt[: LABEL_CHARS - 3] + "..." for prompt in prompts]
    scale = args.scale if args.scale is not None else max(1, 256 // max(height, width))
    label_grid(make_grid(images, nrow=n), labels, scale=scale).save(out / "samples.png")
    if args.images:
        for (i, j), image in zip(jobs, images):
            path = out / f"prompt={i}" / f"sample={j:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            to_pil(image).save(path)
    write_json(
        out / "samples.json",
        {
            "source": args.ckpt or args.pipeline,
            "weights": args.weights if args.ckpt else None,
            "pipeline": type(pipeline).__name__,
            "scheduler": scheduler_name(pipeline.scheduler),
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "seed": args.seed,
            "seeds": "image j of prompt i: seed + i * n_per_prompt + j",
            "prompts": prompts,
            "negative_prompts": negatives,
            "n_per_prompt": n,
            "height": height,
            "width": width,
            "image": args.image,
            "strength": strength,
            "options": {
                name: getattr(args, name)
                for name in ("attention_slicing", "vae_slicing", "vae_tiling", "cpu_offload", "compile")
            },
            "seconds": round(seconds, 3),
            "device": str(device),
        },
    )
    print(f"wrote {out / 'samples.png'} ({images.shape[0]} images, {seconds:.1f} s)")
    return out
