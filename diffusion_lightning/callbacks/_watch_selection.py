"""The modules that :class:`~diffusion_lightning.callbacks.watcher.GradientActivationWatcher` watches.

Modules are chosen by glob patterns on their names and by class names. Frozen components of the
LightningModule, such as the VAE and text encoder of a latent model, are left out unless a
pattern names them.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import lightning.pytorch as pl
import torch

__all__ = ["frozen_components", "select_modules"]


def frozen_components(pl_module: pl.LightningModule) -> list[str]:
    """Names of the direct children of ``pl_module`` that have parameters, none of which trains.

    A component's parameters are all frozen (``requires_grad=False``) when it only serves the
    trained ones, e.g. the VAE and (unless it is trained) the text encoder of a
    ``LatentDiffusionModule``, or the teacher of a distillation.
    """
    frozen = []
    for name, child in pl_module.named_children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.append(name)
    return frozen


def _component(name: str) -> str:
    return name.partition(".")[0]


def select_modules(
    pl_module: pl.LightningModule, patterns: tuple[str, ...], module_types: tuple[str, ...]
) -> list[tuple[str, torch.nn.Module]]:
    """The named submodules of ``pl_module`` that ``patterns`` and ``module_types`` select, in module order.

    A module matches ``patterns`` when it matches one of them (``fnmatch``, ``*`` also crosses dots)
    and ``module_types`` when its class or a base class has one of the names; given both, it must
    match both. Modules of frozen components (:func:`frozen_components`) are only selected by a
    pattern whose first dotted part is the component's name: ``vae.*`` and ``text_encoder`` reach
    them, ``*``, ``*.attentions.*`` and ``module_types`` alone do not. Inside a component that
    trains, every module can be selected, frozen or not (e.g. the base layers of a LoRA UNet, which
    the adapters' gradients flow through).

    Raises:
        ValueError: When a pattern or a class name selects no module, naming it with the module
            names or classes there are, or when no module matches both.
    """
    named = [(name, module) for name, module in pl_module.named_modules() if name]
    model = type(pl_module).__name__
    frozen = set(frozen_components(pl_module))

    def reaches(pattern: str, name: str) -> bool:
        component = _component(name)
        return fnmatchcase(name, pattern) and (component not in frozen or _component(pattern) == component)

    def frozen_hint(names: list[str]) -> str:
        components = sorted({_component(name) for name in names})
        return (
            f"only modules of the frozen component(s) {components} of {model}, whose parameters all have "
            f"requires_grad=False; a pattern that starts with the component's name (e.g. '{components[0]}.*') "
            "watches them."
        )

    for pattern in patterns:
        if any(reaches(pattern, name) for name, _ in named):
            continue
        matched = [name for name, _ in named if fnmatchcase(name, pattern)]
        if matched:
            raise ValueError(f"patterns entry {pattern!r} matches {frozen_hint(matched)}")
        examples = [name for name, _ in named if name.count(".") <= 2][:12]
        raise ValueError(f"patterns entry {pattern!r} matches no module of {model}; module names look like {examples}.")

    classes = {name: {cls.__name__ for cls in type(module).__mro__} for name, module in named}
    unnamed = frozen - {_component(pattern) for pattern in patterns}  # frozen components no pattern names
    for type_name in module_types:
        matched = [name for name, _ in named if type_name in classes[name]]
        if any(_component(name) not in unnamed for name in matched):
            continue
        if matched:
            raise ValueError(f"module_types entry {type_name!r} matches {frozen_hint(matched)}")
        present = sorted({type(module).__name__ for _, module in named})
        raise ValueError(f"module_types entry {type_name!r} matches no module of {model}; it has {present}.")

    selected = [
        (name, module)
        for name, module in named
        if (any(reaches(p, name) for p in patterns) if patterns else _component(name) not in frozen)
        and (not module_types or not classes[name].isdisjoint(module_types))
    ]
    if not selected:
        raise ValueError(
            f"patterns={list(patterns)!r} and module_types={list(module_types)!r} each match modules "
            f"of {model}, but no module matches both."
        )
    return selected
