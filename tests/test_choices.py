"""Choice arguments of the modules are ``Literal`` types: the parser rejects a bad value with the accepted list."""

import inspect
import typing

import pytest

from diffusion_lightning import (
    ClassConditionedDDPM,
    DigitClassifier,
    KnowledgeDistillationModule,
    LatentDiffusionModule,
    ProgressiveDistillationModule,
)
from diffusion_lightning.cli import DiffusionCLI
from diffusion_lightning.losses import LOSS_TYPES, PREDICTION_TYPES
from diffusion_lightning.modules.base import BetaSchedule, DiffusionModule, SamplerName
from diffusion_lightning.modules.distill import TEACHER_WEIGHTS
from diffusion_lightning.modules.latent import ATTENTION, TRAINING_MODES
from diffusion_lightning.modules.nonfinite import NONFINITE_LOSS_MODES
from diffusion_lightning.schedulers import BETA_SCHEDULES, SCHEDULERS
from tests.conftest import REPO, tiny_ddpm

SMOKE = REPO / "configs" / "smoke"

CASES = [
    ("ddpm_mnist.yaml", "loss_type", "l3", LOSS_TYPES),
    ("ddpm_mnist.yaml", "prediction_type", "x0", PREDICTION_TYPES),
    ("ddpm_mnist.yaml", "beta_schedule", "cosine", BETA_SCHEDULES),
    ("ddpm_mnist.yaml", "sampler", "lms", tuple(SCHEDULERS)),
    ("ddpm_mnist.yaml", "nonfinite_loss", "ignore", NONFINITE_LOSS_MODES),
    ("sd_tiny.yaml", "training_mode", "adapter", TRAINING_MODES),
    ("sd_tiny.yaml", "attention", "flash", ATTENTION),
    ("sd_tiny.yaml", "prediction_type", "x0", PREDICTION_TYPES),
    ("distill_students.yaml", "teacher_weights", "best", TEACHER_WEIGHTS),
    ("progressive_distill.yaml", "loss_weighting", "snr", ("truncated_snr", "snr_plus_one", "none")),
    ("classifier_mnist.yaml", "nonfinite_loss", "ignore", NONFINITE_LOSS_MODES),
]


@pytest.mark.parametrize(("config", "field", "bad", "accepted"), CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_parser_rejects_a_bad_choice_naming_the_accepted_values(capsys, config, field, bad, accepted):
    with pytest.raises(SystemExit) as info:
        DiffusionCLI(args=["--config", str(SMOKE / config), f"--model.init_args.{field}", bad], run=False)
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert f'Parser key "{field}"' in error
    assert f"Got value: {bad}" in error or f"Given value: {bad}\n" in error  # a Literal, or a Literal or None
    assert f"Literal[{', '.join(repr(value) for value in accepted)}]" in error


def test_the_literal_types_are_the_runtime_tuples():
    assert typing.get_args(BetaSchedule) == BETA_SCHEDULES
    assert typing.get_args(SamplerName) == tuple(SCHEDULERS)


#: ``str`` arguments that are free text or paths, not choices.
FREE_TEXT = {
    "teacher",
    "pretrained",
    "revision",
    "variant",
    "latent_cache_dir",
    "text_embedding_cache_dir",
    "prior_data_dir",
}
MODULES = [
    DiffusionModule,
    ClassConditionedDDPM,
    LatentDiffusionModule,
    KnowledgeDistillationModule,
    ProgressiveDistillationModule,
    DigitClassifier,
]


@pytest.mark.parametrize("cls", MODULES, ids=lambda cls: cls.__name__)
def test_no_choice_argument_is_a_plain_string(cls):
    hints = typing.get_type_hints(cls.__init__)
    for name in inspect.signature(cls.__init__).parameters:
        hint = hints.get(name)
        if hint is str or any(arg is str for arg in typing.get_args(hint)):  # str, or str | None
            assert name in FREE_TEXT, f"{cls.__name__}.{name} is a plain str; a choice should be a Literal"


def test_python_callers_still_get_the_accepted_values():
    with pytest.raises(ValueError, match=r"loss_type='l3' is not supported; expected one of \['l2', 'l1', 'huber'\]"):
        tiny_ddpm(loss_type="l3")
    with pytest.raises(ValueError, match=r"sampler='lms' is not supported; expected one of \['ddpm', 'ddim'"):
        tiny_ddpm(sampler="lms")
