"""What an evaluation generates and how it scores it: :class:`EvaluationConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from diffusion_lightning.losses import check_choice

__all__ = ["DEFAULT_METRICS", "FEATURE_EXTRACTORS", "METRICS", "EvaluationConfig", "FeatureExtractor", "Metric"]

#: A metric the evaluator knows.
Metric = Literal["judge", "fid", "kid", "precision_recall", "is", "lpips", "clip"]
#: A feature space of FID/KID.
FeatureExtractor = Literal["auto", "digits", "inception"]
#: Every metric the evaluator knows.
METRICS: tuple[str, ...] = get_args(Metric)
#: The ones that need no weights beyond the digit judge.
DEFAULT_METRICS = ("judge", "fid", "kid", "precision_recall")
FEATURE_EXTRACTORS: tuple[str, ...] = get_args(FeatureExtractor)


@dataclass
class EvaluationConfig:
    """What to generate and how to score it.

    Args:
        n_samples: Images to generate, spread evenly over the classes (class models) or the prompts
            (text models): each ``n_samples / len(...)`` times, the first ones get the extra.
        num_inference_steps: Sampling steps; ``None``: the caller's default (the model's).
        guidance_scale: Classifier-free guidance scale; ``None``: the caller's default.
        scheduler: Sampling scheduler name (``ddpm``, ``ddim``, ``dpm``, ...); ``None`` keeps the pipeline's.
        seed: Seed of the CPU generator that draws all the noise.
        batch_size: Images per pipeline call and per feature-extractor call.
        metrics: What to measure: one or more of :data:`METRICS`.
        feature_extractor: Feature space of FID/KID: ``inception`` (InceptionV3 from local weights;
            comparable to published FIDs; an error when the weights are missing), ``digits`` (the
            judge's penultimate layer: a domain FID), or ``auto`` (InceptionV3 when its weights are
            on disk, the judge's features otherwise; ``metrics.json`` records which).
        judge: Path of a :class:`~diffusion_lightning.DigitClassifier` checkpoint (default
            ``outputs/classifier_mnist/checkpoints/last.ckpt``).
        inception_weights: InceptionV3 weights file (default: the torch hub cache).
        lpips_weights: The LPIPS backbone's ImageNet weights (default: the torch hub cache).
        allow_random_lpips: Report LPIPS from a randomly initialised backbone (not comparable).
        clip_model: Local folder of a CLIP model for ``clip``.
        clip_prompt: Text per class for ``clip`` (class models; text models use their prompts);
            ``{name}`` is the class name.
        prompts: Prompts of a text-to-image model (``None``: the model's default prompts, e.g. its
            ``validation_prompts``); an error for a class model.
        prompt_classes: ``{prompt: class}`` for the digit judge, for prompts that name no single digit
            (a prompt's class is otherwise the digit it names: ``7`` or ``seven``).
        reference: A folder of real images (or a captions folder with ``metadata.jsonl``) compared
            with the samples, instead of the data module's ``reference_split``.
        reference_size: Side the ``reference`` images are resized and cropped to (default: the
            short side of its first image).
        reference_split: Split of real images the generated ones are compared with.
        cache_dir: Cache of real-image features (default ``~/.cache/diffusion_lightning``).
        threshold: Judge probability above which a sample counts as ``is_digit``.
        k: Neighbour that sets the manifold balls of precision/recall/realism.
        num_worst: Samples in the worst-samples grid.
        kid_subsets: Random subsets KID averages over.
        progress: Show progress bars.
    """

    n_samples: int = 500
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    seed: int = 0
    batch_size: int = 50
    metrics: list[Metric] = field(default_factory=lambda: list(DEFAULT_METRICS))
    feature_extractor: FeatureExtractor = "auto"
    judge: str | None = None
    inception_weights: str | None = None
    lpips_weights: str | None = None
    allow_random_lpips: bool = False
    clip_model: str | None = None
    clip_prompt: str = "a handwritten digit {name}"
    prompts: list[str] | None = None
    prompt_classes: dict[str, int] | None = None
    reference: str | None = field(default=None, metadata={"metavar": "DIR"})
    reference_size: int | None = None
    reference_split: str = "train"
    cache_dir: str | None = None
    threshold: float = 0.7
    k: int = 3
    num_worst: int = 16
    kid_subsets: int = 100
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n_samples", "batch_size", "k", "num_worst", "kid_subsets"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} is not accepted; expected an int >= 1.")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps!r} must be >= 1 or None.")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be >= 0 or None.")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"metrics={list(self.metrics)!r} is not accepted; choose from {list(METRICS)}.")
        check_choice("feature_extractor", self.feature_extractor, FEATURE_EXTRACTORS)
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r} must be in (0, 1].")
        if "is" in self.metrics and self.feature_extractor == "digits":
            raise ValueError(
                "metrics includes 'is' (Inception Score), which needs InceptionV3: feature_extractor='inception' "
                "(or 'auto' with its weights on disk), not 'digits'."
            )
        if "clip" in self.metrics and not self.clip_model:
            raise ValueError("metrics includes 'clip'; give clip_model, a local folder with a CLIP model.")
        self._check_prompts()
        if self.reference_size is not None and (
            not isinstance(self.reference_size, int) or isinstance(self.reference_size, bool) or self.reference_size < 1
        ):
            raise ValueError(f"reference_size={self.reference_size!r} is not accepted; expected an int >= 1 or None.")

    def _check_prompts(self) -> None:
        if self.prompts is not None:
            prompts = list(self.prompts)
            if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError(f"prompts={prompts!r} is not accepted; expected a list of non-empty strings.")
            repeated = sorted({p for p in prompts if prompts.count(p) > 1})
            if repeated:
                raise ValueError(f"prompts lists {repeated} more than once; list each prompt once.")
        for prompt, value in (self.prompt_classes or {}).items():
            if not isinstance(prompt, str) or not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"prompt_classes has {prompt!r}: {value!r}; expected prompt strings mapped to classes, ints >= 0."
                )
