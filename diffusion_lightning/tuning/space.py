"""Search files: what ``diffusion-lightning tune`` varies, what it keeps fixed and what it optimizes.

A search file is YAML::

    objective: {metric: val/loss, direction: minimize}
    params:
      model.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      model.init_args.p_uncond: {type: float, low: 0.0, high: 0.2}
      data.batch_size: {type: categorical, choices: [32, 64]}
      model.net.layers_per_block: {type: int, low: 1, high: 2}
    fixed: {trainer.max_steps: 200}                      # optional: set in every trial
    pruner: {n_startup_trials: 1, n_warmup_steps: 10}    # optional: pruner keyword arguments

Keys of ``params`` and ``fixed`` are command-line paths of the base config (``--model.learning_rate``
is LightningCLI's shorthand of ``--model.init_args.learning_rate``; both are accepted and resolve to
the same field). :func:`load_search` checks the file's own structure; :meth:`SearchSpace.resolve`
checks every path against the namespace the command line's parser makes of the base config.

Optuna has distributions but no file format for them, and its distributions accept input this
project rejects (``low == high``, unknown keys are a ``TypeError`` far from the file), so the file
is parsed and checked here, field by field, before any trial starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

__all__ = ["DIRECTIONS", "PARAM_TYPES", "Objective", "ParamSpec", "SearchSpace", "load_search", "resolve_path"]

#: Study directions an objective may have.
DIRECTIONS = ("minimize", "maximize")
#: Distribution types of ``params`` entries and the keys each accepts.
PARAM_TYPES: dict[str, frozenset[str]] = {
    "float": frozenset({"type", "low", "high", "log", "step"}),
    "int": frozenset({"type", "low", "high", "log", "step"}),
    "categorical": frozenset({"type", "choices"}),
}
#: Top-level sections of a search file.
SECTIONS = frozenset({"objective", "params", "fixed", "pruner"})
#: Pruner names ``pruner.type`` (and ``tune --pruner``) accept.
PRUNERS = ("median", "hyperband", "none")
_SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Objective:
    """The number a study optimizes."""

    metric: str
    """A key of ``trainer.callback_metrics`` (what the module logs, e.g. ``val/loss``)."""
    direction: str = "minimize"
    """``minimize`` or ``maximize``."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched field and its distribution."""

    path: str
    """The path as the search file writes it; the name of the Optuna parameter."""
    type: str
    """``float``, ``int`` or ``categorical``."""
    low: float | int | None = None
    """Lower bound (``float``/``int``), inclusive."""
    high: float | int | None = None
    """Upper bound (``float``/``int``), inclusive."""
    log: bool = False
    """Sample on a log scale (``float``/``int``)."""
    step: float | int | None = None
    """Discretization step (``float``/``int``; ``int`` defaults to 1)."""
    choices: tuple[Any, ...] = ()
    """Values of a ``categorical`` parameter: ``null``, booleans, numbers or strings."""

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution (what ``trial._suggest`` samples from)."""
        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        low, high = self.low, self.high
        assert low is not None and high is not None
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(low), int(high), log=self.log, step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(float(low), float(high), log=self.log, step=self.step)

    def suggest(self, trial: optuna.Trial) -> Any:
        """Draw this parameter's value for ``trial``."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        low, high = self.low, self.high
        assert low is not None and high is not None
        if self.type == "int":
            return trial.suggest_int(self.path, int(low), int(high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, float(low), float(high), step=self.step, log=self.log)

    def probes(self) -> list[Any]:
        """Values that cover the distribution's extremes: the bounds, or every choice."""
        if self.type == "categorical":
            return list(self.choices)
        return [self.low, self.high]


@dataclass
class SearchSpace:
    """A parsed search file."""

    objective: Objective
    """The metric and its direction."""
    params: dict[str, ParamSpec]
    """Searched fields by path, in file order."""
    fixed: dict[str, Any] = field(default_factory=dict)
    """Values set in every trial, by path."""
    pruner: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the pruner (``type`` picks it; default ``median``)."""
    source: str = "<search>"
    """Where the search came from (named in errors)."""
    resolved: dict[str, str] = field(default_factory=dict)
    """Path as written -> full parser path (``model.init_args.learning_rate``), set by :meth:`resolve`."""

    @property
    def pruner_type(self) -> str | None:
        """``pruner.type`` of the file, or ``None``."""
        return self.pruner.get("type")

    def pruner_kwargs(self) -> dict[str, Any]:
        """The pruner's keyword arguments (``pruner`` without ``type``)."""
        return {k: v for k, v in self.pruner.items() if k != "type"}

    def resolve(self, namespace: Any, fixed_namespace: Any | None = None) -> dict[str, str]:
        """Check every path against parsed configurations; remember their full forms.

        Args:
            namespace: What the command line's parser makes of the base config(s); ``fixed`` paths
                must exist in it.
            fixed_namespace: The same with ``fixed`` applied (``params`` paths must exist in it);
                defaults to ``namespace``.

        Returns:
            :attr:`resolved`.

        Raises:
            ValueError: Naming the first path that is not a field, and two spellings of one field.
        """
        resolved: dict[str, str] = {}
        for section, paths, ns in (
            ("fixed", self.fixed, namespace),
            ("params", self.params, fixed_namespace if fixed_namespace is not None else namespace),
        ):
            for path in paths:
                full = resolve_path(ns, path)
                if full is None:
                    raise ValueError(
                        f"{self.source}: {section}.{path}: no such field in the parsed base config "
                        f"(near {_nearest(ns, path)!r}); write a path as on the command line, e.g. model.learning_rate."
                    )
                other = next((p for p, f in resolved.items() if f == full), None)
                if other is not None:
                    raise ValueError(f"{self.source}: {section}.{path}: names the same field as {other!r} ({full}).")
                resolved[path] = full
        self.resolved = resolved
        return resolved

    def full_path(self, path: str) -> str:
        """The full parser path of ``path`` (after :meth:`resolve`; ``path`` itself before)."""
        return self.resolved.get(path, path)


def resolve_path(namespace: Any, path: str) -> str | None:
    """The full path of a command-line path in a parsed config, or ``None`` when it is not a field.

    ``model.learning_rate`` becomes ``model.init_args.learning_rate`` when ``model`` is a subclass
    entry (``class_path``/``init_args``) without a ``learning_rate`` of its own; the rule applies at
    every level (``model.lr_scheduler.warmup_steps``).

    Args:
        namespace: A jsonargparse namespace (anything with ``in`` and ``get`` on keys).
        path: Dot-separated keys.
    """
    current = namespace
    parts: list[str] = []
    for key in path.split("."):
        if not key or not _has_children(current):
            return None
        if key in current:
            parts.append(key)
        elif "init_args" in current and _has_children(current.get("init_args")) and key in current.get("init_args"):
            parts += ["init_args", key]
        else:
            return None
        current = namespace.get(".".join(parts))
    return ".".join(parts)


def _has_children(value: Any) -> bool:
    return hasattr(value, "keys") and hasattr(value, "get")


def _nearest(namespace: Any, path: str) -> str:
    """The longest prefix of ``path`` that exists, for error messages."""
    keys = path.split(".")
    for n in range(len(keys) - 1, 0, -1):
        prefix = resolve_path(namespace, ".".join(keys[:n]))
        if prefix is not None:
            return prefix
    return "<top level>"


def _number(value: Any, name: str, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        hint = " (YAML reads 1e-5 as a string: write 1.0e-5)" if isinstance(value, str) else ""
        raise ValueError(f"{name}={value!r} must be {kind}{hint}.")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite.")
    return value


def _param(path: str, spec: Any, where: str) -> ParamSpec:
    name = f"{where}: params.{path}"
    if not isinstance(spec, Mapping):
        raise ValueError(f"{name}={spec!r} must be a mapping with a type ({', '.join(PARAM_TYPES)}).")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ValueError(f"{name}.type={kind!r} must be one of {', '.join(PARAM_TYPES)}.")
    unknown = sorted(set(spec) - PARAM_TYPES[kind])
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown} for type {kind}; accepted: {sorted(PARAM_TYPES[kind])}.")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list | tuple) or not choices:
            raise ValueError(f"{name}.choices={choices!r} must be a non-empty list.")
        bad = [c for c in choices if not isinstance(c, _SCALARS)]
        if bad:
            raise ValueError(f"{name}.choices: {bad!r} are not null, booleans, numbers or strings.")
        if len(set(map(repr, choices))) != len(choices):
            raise ValueError(f"{name}.choices={list(choices)!r} repeats a value.")
        return ParamSpec(path, kind, choices=tuple(choices))
    integer = kind == "int"
    for key in ("low", "high"):
        if key not in spec:
            raise ValueError(f"{name}.{key} is required for type {kind}.")
    low = _number(spec["low"], f"{name}.low", integer)
    high = _number(spec["high"], f"{name}.high", integer)
    if low >= high:
        raise ValueError(f"{name}: low={low!r} must be < high={high!r}.")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{name}.log={log!r} must be true or false.")
    if log and low <= 0:
        raise ValueError(f"{name}: log=true needs low > 0, got low={low!r}.")
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{name}.step", integer)
        if step <= 0:
            raise ValueError(f"{name}.step={step!r} must be > 0.")
        if log and not (integer and step == 1):
            raise ValueError(f"{name}: step={step!r} cannot be combined with log=true.")
        if step > high - low:
            raise ValueError(f"{name}.step={step!r} is larger than high - low = {high - low!r}.")
    return ParamSpec(path, kind, low=low, high=high, log=log, step=step)


def _objective(value: Any, where: str) -> Objective:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: objective={value!r} must be a mapping with metric and direction.")
    unknown = sorted(set(value) - {"metric", "direction"})
    if unknown:
        raise ValueError(f"{where}: objective: unknown key(s) {unknown}; accepted: ['direction', 'metric'].")
    metric = value.get("metric")
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"{where}: objective.metric={metric!r} must name a logged metric, e.g. val/loss.")
    direction = value.get("direction", "minimize")
    if direction not in DIRECTIONS:
        raise ValueError(f"{where}: objective.direction={direction!r} must be minimize or maximize.")
    return Objective(metric, direction)


def _paths(value: Any, section: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: {section} must be a mapping of config paths, got {value!r}.")
    for key in value:
        if not isinstance(key, str) or not key or key.startswith(".") or key.endswith(".") or ".." in key:
            raise ValueError(f"{where}: {section}: {key!r} is not a config path like model.learning_rate.")
    return dict(value)


def parse_search(data: Any, source: str = "<search>") -> SearchSpace:
    """A :class:`SearchSpace` from a loaded search file (a mapping), with its structure checked.

    Args:
        data: The YAML document.
        source: Named in error messages.

    Raises:
        ValueError: Naming the first bad field.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: a search file is a mapping with objective and params, got {type(data).__name__}.")
    unknown = sorted(set(data) - SECTIONS)
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown}; accepted: {sorted(SECTIONS)}.")
    if "objective" not in data:
        raise ValueError(
            f"{source}: objective is required (e.g. objective: {{metric: val/loss, direction: minimize}})."
        )
    objective = _objective(data["objective"], source)
    raw_params = _paths(data.get("params"), "params", source)
    if not raw_params:
        raise ValueError(f"{source}: params must name at least one field to search.")
    params = {path: _param(path, spec, source) for path, spec in raw_params.items()}
    fixed = _paths(data.get("fixed"), "fixed", source)
    both = sorted(set(params) & set(fixed))
    if both:
        raise ValueError(f"{source}: fixed.{both[0]} is also in params; a field is either searched or fixed.")
    pruner = data.get("pruner") or {}
    if not isinstance(pruner, Mapping) or not all(isinstance(k, str) for k in pruner):
        raise ValueError(f"{source}: pruner={pruner!r} must be a mapping of keyword arguments.")
    if "type" in pruner and pruner["type"] not in PRUNERS:
        raise ValueError(f"{source}: pruner.type={pruner['type']!r} must be one of {', '.join(PRUNERS)}.")
    return SearchSpace(objective, params, fixed, dict(pruner), source=source)


def load_search(path: str | Path) -> SearchSpace:
    """Read and check a search file (structure only; see :meth:`SearchSpace.resolve` for paths).

    Args:
        path: The YAML file.

    Raises:
        FileNotFoundError: When it does not exist.
        ValueError: Naming the first bad field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from error
    return parse_search(data, source=str(path))
