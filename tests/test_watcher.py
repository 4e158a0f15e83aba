import csv
import math
import warnings
from collections import defaultdict

import jsonargparse
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffusion_lightning.callbacks._watch_selection import frozen_components, select_modules
from diffusion_lightning.callbacks.watcher import GradientActivationWatcher, NonFiniteGradientError
from diffusion_lightning.loggers import media
from tests.conftest import RandomDigits, quiet_trainer, tiny_ddpm

RESNETS = "unet.*.resnets.?"
DOWN = "unet.down_blocks.0.resnets.0"
STATS = ["hist", "mean", "std", "norm", "min", "max", "var", "abs_mean"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is fastest, and immune to other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loader():
    return torch.utils.data.DataLoader(RandomDigits(n=32), batch_size=8)


def reference(values: torch.Tensor) -> dict[str, float]:
    x = values.detach().double().flatten()
    return {
        "mean": x.mean().item(),
        "std": x.std(correction=0).item(),
        "var": x.var(correction=0).item(),
        "norm": x.norm().item(),
        "min": x.min().item(),
        "max": x.max().item(),
        "abs_mean": x.abs().mean().item(),
    }


class Recorder(Callback):
    """Recomputes, independently of the watcher, what it should log for one module at every step."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.activation, self.gradient, self.parameters = {}, {}, {}
        self.hooks_per_step: dict[int, int] = {}
        self._trainer = None
        self._handle = None

    def on_train_start(self, trainer, pl_module):
        self._trainer = trainer
        self._handle = self.module.register_forward_hook(self._record)

    def _record(self, module, args, output):
        self.activation.setdefault(self._trainer.global_step, reference(output))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # runs after the watcher's
        own = 1  # the recorder's hook
        self.hooks_per_step[trainer.global_step] = sum(len(m._forward_hooks) for m in pl_module.modules()) - own

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = list(self.module.parameters())
        self.gradient[trainer.global_step] = reference(torch.cat([p.grad.flatten() for p in params]))
        self.parameters[trainer.global_step] = reference(torch.cat([p.flatten() for p in params]))

    def on_train_end(self, trainer, pl_module):
        self._handle.remove()


class InjectNaN(Callback):
    """Writes a NaN into one gradient after backward at the given step."""

    def __init__(self, step: int, module: str = "unet.up_blocks.0.resnets.0.conv1") -> None:
        self.step, self.module = step, module

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            pl_module.get_submodule(self.module).weight.grad.view(-1)[0] = float("nan")


def no_forward_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def events(logger: TensorBoardLogger) -> EventAccumulator:
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_right_values_every_n_steps_and_a_histogram_budget(tmp_path):
    seed_everything(0)
    model = tiny_ddpm()
    watcher = GradientActivationWatcher(
        patterns=[RESNETS], stats=STATS, log_every_n_steps=2, max_histograms=3, histogram_samples=100
    )
    recorder = Recorder(model.get_submodule(DOWN))
    logger = TensorBoardLogger(tmp_path)
    trainer = quiet_trainer(tmp_path, max_steps=7, logger=logger, callbacks=[watcher, recorder])
    trainer.fit(model, loader())

    assert len(watcher.module_names) == 8 and DOWN in watcher.module_names
    acc = events(logger)
    for kind, expected in [("activation", recorder.activation), ("gradient", recorder.gradient),
                           ("parameters", recorder.parameters)]:  # fmt: skip
        for stat in STATS[1:]:
            logged = {e.step: e.value for e in acc.Scalars(f"debug/{kind}/{DOWN}/{stat}")}
            assert sorted(logged) == [0, 2, 4, 6]
            for step, value in logged.items():
                assert value == pytest.approx(expected[step][stat], rel=1e-4, abs=1e-6), (kind, stat, step)
    # The weights moved between watched steps, and the logged norms followed them.
    norms = [e.value for e in acc.Scalars(f"debug/parameters/{DOWN}/norm")]
    assert len(set(norms)) == 4

    per_step = defaultdict(set)
    for tag in acc.Tags()["histograms"]:
        kind, module = tag.split("/")[1], tag.split("/")[2]
        assert tag.endswith("/hist") and kind in ("activation", "gradient", "parameters")
        for event in acc.Histograms(tag):
            per_step[event.step].add(module)
            assert event.histogram_value.num == 100  # every tensor here is larger: sampled down
    assert sorted(per_step) == [0, 2, 4, 6]
    assert all(len(modules) == 3 for modules in per_step.values())  # the budget
    assert set().union(*per_step.values()) == set(watcher.module_names)  # taken in turn: all covered
    assert watcher.state_dict()["histogram_offset"] == (4 * 3) % 8

    # Hooks only on watched steps, none left after fit.
    assert recorder.hooks_per_step == {s: (8 if s % 2 == 0 else 0) for s in range(7)}
    assert no_forward_hooks(model)


def test_types_and_patterns_select_together_and_watch_kinds_are_honoured(tmp_path):
    model = tiny_ddpm()
    initial = {
        name: torch.cat([p.flatten() for p in m.parameters()]).norm().item()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    }
    watcher = GradientActivationWatcher(
        patterns=["unet.up_blocks.*"], module_types=["Conv2d"], watch=["parameters"], stats=["norm"]
    )
    logger = TensorBoardLogger(tmp_path)
    quiet_trainer(tmp_path, max_steps=1, logger=logger, callbacks=[watcher]).fit(model, loader())
    names = watcher.module_names
    assert names and all(n.startswith("unet.up_blocks.") for n in names)
    assert all(isinstance(model.get_submodule(n), torch.nn.Conv2d) for n in names)
    assert "unet.up_blocks.0.upsamplers.0.conv" in names and "unet.up_blocks.0.resnets.0" not in names
    acc = events(logger)
    assert not acc.Tags()["histograms"]
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("debug/")]
    assert sorted(tags) == sorted(f"debug/parameters/{n}/norm" for n in names)
    for name in names:  # max_steps=1: the norms of the initial weights
        (event,) = acc.Scalars(f"debug/parameters/{name}/norm")
        assert event.step == 0 and event.value == pytest.approx(initial[name], rel=1e-5)


def test_nonfinite_gradient_stops_training_naming_module_and_step(tmp_path):
    model = tiny_ddpm()
    watcher = GradientActivationWatcher(patterns=[RESNETS], log_every_n_steps=2)
    trainer = quiet_trainer(tmp_path, max_steps=8, callbacks=[InjectNaN(step=3), watcher])
    with pytest.raises(
        FloatingPointError, match=r"global step 3: first in module 'unet\.up_blocks\.0\.resnets\.0\.conv1'"
    ):
        trainer.fit(model, loader())
    model = tiny_ddpm()
    trainer = quiet_trainer(tmp_path, max_steps=8, callbacks=[InjectNaN(step=4), GradientActivationWatcher(watch=[])])
    with pytest.raises(NonFiniteGradientError) as info:
        trainer.fit(model, loader())
    assert info.value.global_step == 4 and info.value.module_name == "unet.up_blocks.0.resnets.0.conv1"
    assert trainer.global_step == 4  # the failing step was never taken
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_activation_is_named_in_the_error(tmp_path):
    model = tiny_ddpm()
    step_of = {}

    class Poison(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step_of["step"] = trainer.global_step

    def poison(module, args, output):  # the mid block's output turns NaN at step 2, and the loss with it
        return output * float("nan") if step_of["step"] == 2 else output

    handle = model.unet.mid_block.register_forward_hook(poison)
    watcher = GradientActivationWatcher(patterns=[RESNETS, "unet.mid_block"], log_every_n_steps=2)
    trainer = quiet_trainer(tmp_path, max_steps=5, callbacks=[Poison(), watcher])
    warning = "Non-finite activation at global step 2: first in module 'unet.mid_block'"
    with pytest.warns(UserWarning, match=warning), pytest.raises(NonFiniteGradientError, match="step 2") as info:
        trainer.fit(model, loader())
    handle.remove()
    assert "The loss is nan" in str(info.value)
    assert "first non-finite activation was in module 'unet.mid_block'" in str(info.value)
    assert no_forward_hooks(model)


def test_skip_nonfinite_skips_the_step_and_keeps_weights_finite(tmp_path):
    model = tiny_ddpm()
    snapshots = {}

    class Snapshot(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    watcher = GradientActivationWatcher(patterns=[RESNETS], log_every_n_steps=2, skip_nonfinite=True)
    trainer = quiet_trainer(tmp_path, max_steps=6, callbacks=[InjectNaN(step=3), watcher, Snapshot()])
    with pytest.warns(UserWarning, match=r"global step 3: first in module 'unet\.up_blocks\.0\.resnets\.0\.conv1'"):
        trainer.fit(model, loader())
    assert trainer.global_step == 6 and watcher.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))  # step 3 changed nothing
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[4], snapshots[5]))  # step 4 trained again
    assert all(torch.isfinite(p).all() for p in model.parameters())

    path = tmp_path / "watcher.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][watcher.state_key]
    restored = GradientActivationWatcher(patterns=[RESNETS], log_every_n_steps=2, skip_nonfinite=True)
    restored.load_state_dict(state)
    assert restored.state_dict() == watcher.state_dict() == {"histogram_offset": 0, "skipped_steps": 1}


def test_hooks_are_removed_when_training_fails_mid_step(tmp_path):
    model = tiny_ddpm()

    class Boom(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                assert not no_forward_hooks(pl_module)  # the watcher's hooks are in place
                raise RuntimeError("boom")

    watcher = GradientActivationWatcher(patterns=[RESNETS], log_every_n_steps=2)
    trainer = quiet_trainer(tmp_path, max_steps=5, callbacks=[watcher, Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, loader())
    assert no_forward_hooks(model)


def test_csv_logger_gets_scalars_and_one_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(media, "_WARNED", set())
    model = tiny_ddpm()
    watcher = GradientActivationWatcher(patterns=[DOWN], stats=["norm", "hist"], log_every_n_steps=1)
    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(tmp_path, max_steps=3, logger=logger, callbacks=[watcher])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader())
    assert [str(w.message) for w in caught if "cannot log" in str(w.message)] == [
        "CSVLogger cannot log histograms; only scalars are logged there."
    ]
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for kind in ("activation", "gradient", "parameters"):
        values = {int(r["step"]): float(r[f"debug/{kind}/{DOWN}/norm"]) for r in rows if r[f"debug/{kind}/{DOWN}/norm"]}
        assert sorted(values) == [0, 1, 2] and all(math.isfinite(v) and v > 0 for v in values.values())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(patterns=["unet"], log_every_n_steps=0), r"log_every_n_steps=0 must be an integer >= 1"),
        (dict(patterns=["unet"], stats=["mean", "median"]), r"stats=.*'median'.*accepted: \['hist', 'mean'"),
        (dict(patterns=["unet"], watch=["weights"]), r"watch=\['weights'\].*accepted: \['activations'"),
        (dict(patterns=["unet"], max_histograms=-1), r"max_histograms=-1 must be >= 0"),
        (dict(patterns=["unet"], stats=[]), r"stats=\[\] is empty"),
        (dict(patterns=["unet"], histogram_samples=0), r"histogram_samples=0 must be >= 1, or None"),
        (dict(), r"patterns=None and module_types=None select no module"),
    ],
)
def test_bad_arguments_are_rejected_at_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradientActivationWatcher(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(patterns=["unet.encoder.*"]),
            r"patterns entry 'unet\.encoder\.\*' matches no module of ClassConditionedDDPM; "
            r"module names look like \['unet', 'unet\.conv_in'",
        ),
        (dict(module_types=["Conv3d"]), r"module_types entry 'Conv3d' matches no module.*'Conv2d'"),
        (dict(patterns=["unet.time_embedding"], module_types=["Conv2d"]), r"no module matches both"),
    ],
)
def test_selection_that_matches_nothing_fails_before_training(tmp_path, kwargs, message):
    model = tiny_ddpm()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[GradientActivationWatcher(**kwargs)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, loader())
    assert trainer.global_step == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_builds_from_a_yaml_callbacks_entry():
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    config = parser.parse_string(
        """
        callbacks:
          - class_path: diffusion_lightning.callbacks.watcher.GradientActivationWatcher
            init_args: {patterns: ["unet.*.resnets.?"], stats: [norm, hist], log_every_n_steps: 10,
                        skip_nonfinite: true}
        """
    )
    (watcher,) = parser.instantiate(config).callbacks
    assert isinstance(watcher, GradientActivationWatcher)
    assert watcher.patterns == ("unet.*.resnets.?",) and watcher.stats == ("norm", "hist")
    assert watcher.log_every_n_steps == 10 and watcher.skip_nonfinite


# ---------------------------------------------------------------------- frozen components


def lora_latent(**kwargs):
    from diffusion_lightning import LatentDiffusionModule

    return LatentDiffusionModule(components={"seed": 0}, training_mode="lora", lora_rank=2, **kwargs)


def fit_latent(tmp_path, watcher: GradientActivationWatcher, **kwargs) -> dict[str, float]:
    """One watched step of the LoRA latent model; the ``debug/`` norms it logged, by metric name."""
    from diffusion_lightning import ImageCaptionDataModule

    logger = CSVLogger(tmp_path)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, logger=logger, callbacks=[watcher])
    trainer.fit(lora_latent(**kwargs), ImageCaptionDataModule(resolution=16, max_samples=16, batch_size=4))
    with open(f"{logger.log_dir}/metrics.csv") as f:
        return {k: float(v) for row in csv.DictReader(f) for k, v in row.items() if k.startswith("debug/") and v}


def test_frozen_components_are_only_watched_where_a_pattern_names_them(tmp_path):
    module = lora_latent()
    assert frozen_components(module) == ["vae", "text_encoder"]
    assert frozen_components(lora_latent(lora_text_encoder=True)) == ["vae"]
    assert frozen_components(tiny_ddpm()) == []

    # the default config's selection: every ResNet block of the UNet, frozen base weights and all, none of the VAE's
    watcher = GradientActivationWatcher(module_types=["ResnetBlock2D"], stats=["norm"], log_every_n_steps=1)
    logged = fit_latent(tmp_path / "types", watcher)
    model_resnets = [n for n, m in module.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    assert any(n.startswith("vae.") for n in model_resnets)
    assert watcher.module_names == [n for n in model_resnets if n.startswith("unet.")]
    activations = {k.split("/")[2] for k in logged if k.startswith("debug/activation/")}
    assert activations == set(watcher.module_names)
    assert all(v > 0 for v in logged.values())
    assert not any(k.startswith("debug/gradient/") for k in logged)  # their weights are frozen: no gradients

    # a wildcard that also matches the VAE's attention keeps to the UNet's, where the adapters are; naming the
    # VAE in another pattern adds what that pattern matches, not what the wildcard does
    def names(*patterns: str) -> set[str]:
        return {name for name, _ in select_modules(module, patterns, ())}

    unet_attentions = names("*.attentions.0")
    assert unet_attentions and all(n.startswith("unet.") for n in unet_attentions)
    assert names("*.attentions.0", "vae") == unet_attentions | {"vae"}
    assert names("vae.*.attentions.0") == {"vae.encoder.mid_block.attentions.0", "vae.decoder.mid_block.attentions.0"}

    # a pattern that names the VAE watches it: its encoder runs in every training step
    watcher = GradientActivationWatcher(
        patterns=["vae.encoder.down_blocks.*.resnets.?"], watch=["activations"], stats=["norm"], log_every_n_steps=1
    )
    logged = fit_latent(tmp_path / "named", watcher)
    assert watcher.module_names == ["vae.encoder.down_blocks.0.resnets.0", "vae.encoder.down_blocks.1.resnets.0"]
    assert sorted(logged) == [f"debug/activation/{n}/norm" for n in watcher.module_names]


@pytest.mark.parametrize(
    ("patterns", "module_types", "message"),
    [
        ((), ("AutoencoderKL",), r"module_types entry 'AutoencoderKL' matches only modules of the frozen"),
        (("*.encoder.*",), (), r"'\*\.encoder\.\*' matches only .* \['text_encoder', 'vae'\].*'text_encoder\.\*'"),
    ],
    ids=["types", "pattern"],
)
def test_a_selection_of_frozen_modules_alone_is_rejected_with_a_hint(patterns, module_types, message):
    with pytest.raises(ValueError, match=message):
        select_modules(lora_latent(), patterns, module_types)
