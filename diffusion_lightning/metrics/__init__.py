"""Evaluation of generated images: the digit judge, FID/KID/IS, precision/recall/realism, LPIPS, CLIP score.

Class-conditioned models are scored class by class, text-to-image models prompt by prompt.

Everything runs offline: standard networks (InceptionV3, the LPIPS backbone, CLIP) load from local
files only, and the digit judge's feature space gives a domain FID when they are absent.
"""

from diffusion_lightning.metrics.clip import CLIPScorer, clip_score
from diffusion_lightning.metrics.config import DEFAULT_METRICS, METRICS, EvaluationConfig
from diffusion_lightning.metrics.distribution import FewSamplesWarning, fid, inception_score, kid
from diffusion_lightning.metrics.evaluator import Evaluator
from diffusion_lightning.metrics.features import DigitFeatures, FeatureExtractor, PrecomputedFeatures, check_image_range
from diffusion_lightning.metrics.folders import FolderReference
from diffusion_lightning.metrics.inception import InceptionFeatures, InceptionWeightsMissing, resolve_inception_weights
from diffusion_lightning.metrics.judge import JudgeMissing, judge_scores, load_judge, summarize
from diffusion_lightning.metrics.lpips import LPIPSDiversity, LPIPSWeightsMissing
from diffusion_lightning.metrics.manifold import ManifoldScores, kth_neighbour_radii, manifold_scores
from diffusion_lightning.metrics.prompts import PromptSet, digits_in, prompt_classes, read_prompts
from diffusion_lightning.metrics.reference import RealReference, dataset_key, default_cache_dir, real_reference
from diffusion_lightning.metrics.report import EvaluationResult
from diffusion_lightning.metrics.scoring import Groups

__all__ = [
    "CLIPScorer",
    "InceptionFeatures",
    "InceptionWeightsMissing",
    "LPIPSDiversity",
    "LPIPSWeightsMissing",
    "clip_score",
    "resolve_inception_weights",
    "DEFAULT_METRICS",
    "METRICS",
    "DigitFeatures",
    "EvaluationConfig",
    "EvaluationResult",
    "Evaluator",
    "FeatureExtractor",
    "FewSamplesWarning",
    "FolderReference",
    "Groups",
    "JudgeMissing",
    "ManifoldScores",
    "PrecomputedFeatures",
    "PromptSet",
    "RealReference",
    "check_image_range",
    "dataset_key",
    "default_cache_dir",
    "digits_in",
    "fid",
    "inception_score",
    "judge_scores",
    "kid",
    "kth_neighbour_radii",
    "load_judge",
    "manifold_scores",
    "prompt_classes",
    "read_prompts",
    "real_reference",
    "summarize",
]
