"""Model cards: the ``README.md`` of every exported folder, in the Hugging Face convention.

A card is YAML front matter (``huggingface_hub``'s :class:`~huggingface_hub.ModelCardData`) and a
Markdown body. The front matter holds ``library_name: diffusers``, the ``pipeline_tag``, ``tags``
(``diffusers``, ``diffusion_lightning``, the objective, the architecture, ``lora`` for adapters),
``base_model`` (and ``base_model_relation``) for a model fine-tuned from ``pretrained``, the
``license`` and, as ``model-index``, the latest metrics known: those of the last ``evaluate`` of the
run or of the folder, else the run's final training metrics. The body says what was trained on what
and for how long (from the checkpoint, the run's ``metrics.json`` summary and its ``config.yaml``),
the key configuration, the metrics, the sample grid ``samples.png`` and how to load the folder.

``diffusion-lightning evaluate --pipeline DIR`` rewrites the card of ``DIR`` with its metrics
(:func:`update_card_metrics`), in one rename; nothing else in the folder is touched.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from diffusion_lightning.utils.io import atomic_write_text, save_image
from diffusion_lightning.utils.run_record import RunRecord, headline_metrics, read_run

__all__ = [
    "CARD_FILE",
    "DEFAULT_LICENSE",
    "EVALUATE_SOURCE",
    "KINDS",
    "SAMPLES_FILE",
    "TRAINING_SOURCE",
    "ModelCardOptions",
    "RunRecord",
    "check_license",
    "headline_metrics",
    "model_card",
    "read_run",
    "update_card_metrics",
    "write_model_card",
]

#: The card's file name in an exported folder.
CARD_FILE = "README.md"
#: The sample grid beside the card.
SAMPLES_FILE = "samples.png"
#: What an exported folder holds: a complete pipeline, LoRA adapter weights, or one AutoencoderKL.
KINDS = ("pipeline", "lora", "vae")
#: The license of a card unless one is given: the Hub's ``other``, since the terms of a model trained
#: here depend on its data and on the base model it was fine-tuned from, which only its owner can state.
DEFAULT_LICENSE = "other"
#: ``source_name`` of the metrics that ``evaluate`` writes into a card (``model-index``).
EVALUATE_SOURCE = "diffusion-lightning evaluate"
#: ``source_name`` of the training metrics of the run (its validation loss, ...).
TRAINING_SOURCE = "diffusion-lightning fit"
#: ``source_url`` of both (the Hub wants one with every ``source_name``): the project's documentation.
SOURCE_URL = "https://github.com/diffusion-lightning/diffusion_lightning#readme"
_LICENSE = re.compile(r"^[a-z0-9][a-z0-9.+\-]*$")
_EVAL_START, _EVAL_END = "<!-- evaluation -->", "<!-- /evaluation -->"


def check_license(license: str) -> str:
    """``license`` when it is a Hub license identifier (``apache-2.0``, ``mit``, ``openrail++``, ``other``...).

    Raises:
        ValueError: Naming ``license``, the value and what is accepted.
    """
    if not isinstance(license, str) or not _LICENSE.match(license):
        raise ValueError(
            f"license={license!r} is not accepted; give a Hugging Face Hub license identifier such as apache-2.0, "
            "mit, cc-by-4.0, openrail++ or other (lowercase letters, digits, '.', '+' and '-')."
        )
    return license


@dataclass
class ModelCardOptions:
    """How ``export`` writes the card of a folder."""

    license: str = DEFAULT_LICENSE
    """Hub license identifier of the exported weights."""
    run: RunRecord | None = None
    """What the run said about the checkpoint (see :func:`read_run`)."""
    samples: bool = False
    """Generate a small sample grid with the exported model when the run left none."""

    def __post_init__(self) -> None:
        check_license(self.license)


# ---------------------------------------------------------------------- describing a module


def _hparam(module: Any, name: str) -> Any:
    hparams = getattr(module, "hparams", None) or {}
    return hparams.get(name) if hasattr(hparams, "get") else None


def _is_text_model(module: Any) -> bool:
    return hasattr(module, "validation_prompts") or getattr(module, "tokenizer", None) is not None


def _denoiser_class(module: Any) -> str | None:
    for name in ("denoiser", "unet", "transformer"):
        try:
            net = getattr(module, name, None)
        except (AttributeError, NotImplementedError):
            net = None
        if net is not None:
            return type(net).__name__
    return None


def _pipeline_tag(kind: str) -> str | None:
    if kind == "vae":
        return None  # one model, a component of latent pipelines: no generation task of its own
    # A class-conditioned model is asked for an image of a named class: the nearest Hub task is
    # text-to-image (a short condition in, an image out); unconditional-image-generation would say that
    # the model takes no input, and the Hub has no class-to-image task.
    return "text-to-image"


def _tags(kind: str, module: Any) -> list[str]:
    tags = ["diffusers", "diffusion_lightning"]
    if kind == "vae":
        tags += ["autoencoder", "vae", "AutoencoderKL"]
        return tags
    tags.append("flow-matching" if getattr(module, "is_flow", False) else "ddpm")
    tags.append("text-to-image" if _is_text_model(module) else "class-conditional")
    if getattr(module, "training_mode", None) == "lora":
        tags.append("lora")
    arch = _denoiser_class(module)
    if arch:
        tags.append(arch)
    return tags


def _config_lines(kind: str, module: Any, pipeline: Any) -> list[tuple[str, Any]]:
    lines: list[tuple[str, Any]] = []
    if kind != "vae":
        sampler = type(pipeline.scheduler).__name__ if pipeline is not None else getattr(module, "sampler", None)
        lines += [
            ("prediction type", getattr(module, "prediction_type", None)),
            ("loss", getattr(module, "loss_type", None)),
            ("sampler", sampler),
            ("inference steps", getattr(module, "num_inference_steps", None)),
            ("guidance scale", getattr(module, "guidance_scale", None)),
            ("denoiser", _denoiser_class(module)),
        ]
    lines += [
        ("learning rate", getattr(module, "learning_rate", None)),
        ("image size", getattr(module, "image_size", None)),
    ]
    mode = getattr(module, "training_mode", None)
    if mode is not None:
        lines.append(("training mode", mode))
    lora = getattr(module, "lora_config", None)
    if mode == "lora" and isinstance(lora, dict):
        lines += [("LoRA rank", lora.get("r")), ("LoRA alpha", lora.get("lora_alpha"))]
    if getattr(module, "num_classes", None) and not _is_text_model(module):
        lines.append(("classes", module.num_classes))
        if getattr(module, "class_names", None):
            lines.append(("class names", ", ".join(map(str, module.class_names))))
    if kind == "vae":
        lines += [
            ("latent scaling factor", getattr(module, "scaling_factor", None)),
            ("KL weight", _hparam(module, "kl_weight")),
        ]
    return [(k, v) for k, v in lines if v is not None]


def _eval_results(task: str, metrics: dict[str, float], dataset: str, source: str) -> list[EvalResult]:
    return [
        EvalResult(
            task_type=task,
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=metric,
            metric_name=metric,
            metric_value=value,
            source_name=source,
            source_url=SOURCE_URL,
        )
        for metric, value in metrics.items()
    ]


def _metrics_section(results: list[EvalResult]) -> str:
    lines = [_EVAL_START, "## Evaluation", ""]
    if not results:
        lines.append("No metrics yet: run `diffusion-lightning evaluate --pipeline <this folder>` to add them here.")
    else:
        lines += ["| metric | value | data | source |", "| --- | --- | --- | --- |"]
        lines += [f"| {r.metric_type} | {r.metric_value:.6g} | {r.dataset_name} | {r.source_name} |" for r in results]
    lines.append(_EVAL_END)
    return "\n".join(lines)


def _load_snippet(kind: str, module: Any, pipeline: Any, folder: str, base_model: str | None) -> str:
    where = f"./{folder}"
    if kind == "vae":
        return f'from diffusers import AutoencoderKL\n\nvae = AutoencoderKL.from_pretrained("{where}")\n'
    steps, guidance = getattr(module, "num_inference_steps", 25), getattr(module, "guidance_scale", 7.5)
    prompt = next(iter(getattr(module, "validation_prompts", None) or []), "a prompt")
    if kind == "lora":
        base = base_model or "<the base model>"
        return (
            "from diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{base}")\n'
            f'pipe.load_lora_weights("{where}")\n'
            f"image = pipe({prompt!r}, num_inference_steps={steps}, guidance_scale={guidance}).images[0]\n"
        )
    call = f"images = pipe(class_labels=[0, 1, 2], num_inference_steps={steps}, guidance_scale={guidance}).images\n"
    if not _is_text_model(module):
        return (
            "from diffusers import DiffusionPipeline\n\n"
            "# diffusers alone: the folder's pipeline.py (and unet/*.py) define its classes\n"
            f'pipe = DiffusionPipeline.from_pretrained("{where}", custom_pipeline="{where}", trust_remote_code=True)\n'
            + call
            + "\n"
            "# with diffusion_lightning installed, no remote code is run:\n"
            "# from diffusion_lightning import ClassConditionedPipeline\n"
            f'# pipe = ClassConditionedPipeline.from_pretrained("{where}")\n'
        )
    return (
        "from diffusers import DiffusionPipeline\n\n"
        f'pipe = DiffusionPipeline.from_pretrained("{where}")\n'
        f"image = pipe({prompt!r}, num_inference_steps={steps}, guidance_scale={guidance}).images[0]\n"
    )


def _training_lines(module: Any, run: RunRecord | None) -> list[str]:
    cls = type(module)
    lines = [f"- module: `{cls.__module__}.{cls.__qualname__}`"]
    if run is None:
        return [*lines, "- data, steps and time: unknown (exported from a module, not from a run's checkpoint)"]
    if run.data:
        args = ", ".join(f"{k}={v!r}" for k, v in run.data_args.items() if isinstance(v, (str, int, float, bool)))
        lines.append(f"- data: `{run.data}`" + (f" ({args})" if args else ""))
    if run.checkpoint:
        lines.append(f"- checkpoint: `{Path(run.checkpoint).name}`, step {run.global_step}, epoch {run.epoch}")
    if run.run_steps is not None:
        lines.append(f"- the run: {run.run_steps} steps, {run.run_epochs} epochs, {run.status}")
    if run.wall_time_s is not None:
        lines.append(f"- wall time of the last fit: {run.wall_time_s / 60:.1f} min")
    lines += [f"- {k}: {v}" for k, v in run.trainer.items()]
    return lines


def model_card(
    module: Any,
    folder_name: str,
    kind: str,
    pipeline: Any = None,
    options: ModelCardOptions | None = None,
    samples: str | None = None,
) -> ModelCard:
    """The card of an exported folder.

    Args:
        module: The module exported.
        folder_name: The folder's final name (for the loading snippet).
        kind: ``pipeline`` (a complete pipeline), ``lora`` (adapter weights) or ``vae`` (one AutoencoderKL).
        pipeline: The pipeline saved, when there is one.
        options: License, run record and samples (default: :class:`ModelCardOptions`).
        samples: The sample grid's file name in the folder, when it has one.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not accepted; expected one of {list(KINDS)}.")
    options = options or ModelCardOptions()
    run = options.run
    base_model = _hparam(module, "pretrained")
    tag = _pipeline_tag(kind)
    task = tag or "image-to-image"  # model-index needs a task: a VAE reconstructs images
    results = []
    if run is not None:  # the latest evaluation first, then the training metrics
        results += _eval_results(task, run.evaluation, run.dataset, EVALUATE_SOURCE)
        results += _eval_results(task, run.metrics, run.dataset, TRAINING_SOURCE)
    relation = None
    if base_model:
        relation = "adapter" if kind == "lora" else "finetune"
    data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=tag,
        tags=_tags(kind, module),
        base_model=base_model,
        base_model_relation=relation,
        license=options.license,
        model_name=folder_name if results else None,
        eval_results=results or None,
    )
    what = {
        "pipeline": f"{type(pipeline).__name__ if pipeline is not None else 'diffusers'} pipeline",
        "lora": "LoRA adapter weights",
        "vae": "AutoencoderKL",
    }
    intro = f"{what[kind]} trained with diffusion_lightning (`{type(module).__name__}`)"
    if base_model:
        intro += f", fine-tuned from `{base_model}`" + (" (its license applies too)" if kind != "vae" else "")
    body = [f"# {folder_name}", "", intro + ".", "", "## Training", "", *_training_lines(module, run), ""]
    body += ["## Configuration", "", *[f"- {k}: {v}" for k, v in _config_lines(kind, module, pipeline)], ""]
    body += [_metrics_section(results), ""]
    body += ["## Samples", ""]
    body.append(f"![samples]({samples})" if samples else "No sample grid was saved with this folder.")
    body += [
        "",
        "## How to load",
        "",
        "```python",
        _load_snippet(kind, module, pipeline, folder_name, base_model).rstrip(),
    ]
    body += ["```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def _sample_grid(module: Any, pipeline: Any) -> Any:
    """A small grid from ``pipeline``, or ``None`` when it cannot make one.

    At most 10 steps and a fixed seed: 4 images of each of the first 10 classes, or one of each of the first 2
    prompts (the module's validation prompts).
    """
    import torch

    from diffusion_lightning.pipelines.conditioning import generate
    from diffusion_lightning.utils.images import label_grid, make_grid

    steps = min(int(getattr(module, "num_inference_steps", 10) or 10), 10)
    guidance = float(getattr(module, "guidance_scale", 1.0))
    pipeline.set_progress_bar_config(disable=True)
    try:
        spec = module.condition_spec()
        conditions = spec.resolve()
    except (AttributeError, ValueError):
        return None
    per = 4 if spec.kind == "class" else 1
    conditions = conditions[: 10 if spec.kind == "class" else 2].repeat_each(per)
    generators = [torch.Generator().manual_seed(i) for i in range(len(conditions))]
    images = generate(
        pipeline,
        conditions,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators,
        image_size=getattr(module, "image_size", None),
    )
    grid = make_grid(images, nrow=per if spec.kind == "class" else len(conditions))
    return label_grid(grid, list(conditions.names[::per]) if spec.kind == "class" else None, scale=2)


def write_model_card(
    folder: str | Path,
    module: Any,
    final_path: str | Path,
    kind: str = "pipeline",
    pipeline: Any = None,
    options: ModelCardOptions | None = None,
) -> Path:
    """Write ``README.md`` (and ``samples.png`` when there is a grid) into the folder being exported.

    The grid is the run's newest sample grid when it left one, else (with ``options.samples``) one drawn
    by ``pipeline``.
    """
    folder = Path(folder)
    options = options or ModelCardOptions()
    samples = None
    if options.run is not None and options.run.sample_grid is not None:
        shutil.copyfile(options.run.sample_grid, folder / SAMPLES_FILE)
        samples = SAMPLES_FILE
    elif options.samples and pipeline is not None:
        grid = _sample_grid(module, pipeline)
        if grid is not None:
            save_image(grid, folder / SAMPLES_FILE)
            samples = SAMPLES_FILE
    card = model_card(module, Path(final_path).name, kind, pipeline, options, samples)
    return atomic_write_text(folder / CARD_FILE, str(card))


def update_card_metrics(folder: str | Path, metrics: dict[str, Any], dataset: str) -> Path:
    """Put the metrics of an evaluation of the pipeline folder into its card, replacing those of an earlier one.

    The card (a minimal one when the folder has none) is rewritten through a temporary file and one
    rename; every other file of the folder stays as it is.
    """
    path = Path(folder) / CARD_FILE
    if path.is_file():
        card = ModelCard.load(path, ignore_metadata_errors=True)
    else:
        data = ModelCardData(library_name="diffusers", tags=["diffusers", "diffusion_lightning"])
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {Path(folder).resolve().name}\n")
    data = card.data
    name = getattr(data, "model_name", None) or Path(folder).resolve().name
    task = getattr(data, "pipeline_tag", None) or "text-to-image"
    kept = [r for r in (getattr(data, "eval_results", None) or []) if r.source_name != EVALUATE_SOURCE]
    results = _eval_results(task, headline_metrics(metrics), dataset, EVALUATE_SOURCE) + kept
    data.model_name, data.eval_results = name, results or None
    text = card.text
    section = _metrics_section(results)
    if _EVAL_START in text and _EVAL_END in text:
        head, rest = text.split(_EVAL_START, 1)
        text = head + section + rest.split(_EVAL_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    new = ModelCard(f"---\n{data.to_yaml()}\n---\n{text}")
    return atomic_write_text(path, str(new))
