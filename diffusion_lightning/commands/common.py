"""What the commands share: parsers derived from config dataclasses, the model source and the sampling options.

A command's options are the fields of dataclasses: :func:`add_dataclass_flags` adds each field as a
flag whose type, default and help come from the dataclass (its annotations, defaults and field
docstrings), and :func:`from_args` builds the dataclass back from the parsed values. The parser is
jsonargparse's, so values are validated against the field types (a ``Literal`` field accepts its
listed values only), and :class:`CommandParser` turns every mistake into one ``error: ...`` line
naming the flag, the value and what is accepted (see :mod:`diffusion_lightning.errors`).

Flag rules, the same for every command:

- a field ``name_with_parts`` is ``--name-with-parts`` and ``--name_with_parts``;
- list fields take one or more space-separated values (``--metrics judge fid``);
- a ``bool`` field is a switch that flips its default: ``--name`` when it defaults to ``False``,
  ``--no-name`` when it defaults to ``True``;
- a field without a default is a required flag;
- field metadata may add ``flags`` (option strings listed first, e.g. a short alias; the first one names the
  flag in messages), a ``metavar``, ``positional=True`` (a positional argument instead of a flag) and
  ``repeat=True`` (a list flag that may also be given several times, its values accumulating).

The loading of what training leaves behind is :mod:`diffusion_lightning.modules.loading`; here its
errors become the commands' messages.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union

import docstring_parser
from diffusers import DiffusionPipeline
from jsonargparse import ArgumentParser, Namespace

from diffusion_lightning.errors import OneLineErrors
from diffusion_lightning.modules.loading import WEIGHTS, load_pipeline_source
from diffusion_lightning.schedulers import SCHEDULERS

__all__ = [
    "CommandParser",
    "PipelineSource",
    "SamplingOptions",
    "add_dataclass_flags",
    "flag_name",
    "from_args",
    "load_pipeline",
]

T = TypeVar("T")

#: Scheduler names ``--scheduler`` accepts.
SchedulerName = Literal[tuple(sorted(SCHEDULERS))]  # type: ignore[valid-type]
#: Which weights of a checkpoint ``--weights`` loads.
WeightsName = Literal[WEIGHTS]  # type: ignore[valid-type]


class CommandParser(OneLineErrors, ArgumentParser):
    """jsonargparse's parser, whose mistakes end the command with one ``error: ...`` line.

    The line names the flag, the value given and what the flag accepts (a ``Literal`` field's
    values, or the type), instead of a usage block and a multi-line type report; an unknown flag
    close to a known one adds a ``hint: did you mean ...?`` line (see
    :class:`~diffusion_lightning.errors.OneLineErrors`).
    """

    def one_line_error(self, message: str) -> str:
        """``message`` as one line, naming a flag by its option string and what its field accepts."""
        key = re.match(r'Parser key "([^"]+)"(?: element \d+)?:', message)
        if key is not None:
            action = self._action(key.group(1))
            given = re.findall(r"(?:Got value|Given value): (.*)", message)
            accepts = getattr(action, "field_type", None)
            if accepts is not None and given:
                return f"{_option(action)} {given[-1].strip()!r} is not accepted; expected {_describe(accepts)}."
        required = re.match(r"the following arguments are required: (.*)", message)
        if required is not None:
            names = [_option(self._action(name) or name) for name in required.group(1).split(", ")]
            return f"the following arguments are required: {', '.join(names)}"
        return super().one_line_error(message)

    def _action(self, dest: str) -> Any:
        return next((action for action in self._actions if action.dest == dest), None)


def _option(action: Any) -> str:
    """The flag that names ``action`` in messages (its first option string), or a positional's name."""
    if isinstance(action, str):
        return action
    return action.option_strings[0] if action.option_strings else action.dest


def _describe(typehint: Any) -> str:
    """What ``typehint`` accepts, in words (``one of: a, b``, ``an int``, ...)."""
    origin, args = typing.get_origin(typehint), typing.get_args(typehint)
    if origin is Literal:
        return "one of: " + ", ".join(str(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args if arg is not type(None))
    names = {int: "an int", float: "a number", str: "a string", bool: "true or false"}
    return names.get(typehint, str(typehint))


def flag_name(name: str) -> str:
    """The option string of the field ``name``: ``--name-with-dashes``."""
    return "--" + name.replace("_", "-")


def _optional_inner(hint: Any) -> Any:
    """``X`` for ``X | None`` (``hint`` itself otherwise)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        inner = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return hint


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation (Google ``Args:`` or attribute docstrings), base classes included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            try:
                params = docstring_parser.parse_from_object(klass).params
            except (OSError, TypeError):  # no source to read attribute docstrings from
                params = docstring_parser.parse(klass.__doc__ or "").params
            docs.update({param.arg_name: param.description or "" for param in params})
    return docs


def _help(doc: str) -> str:
    """A field's documentation as help text: one paragraph, reST roles and literals as plain text."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?(\w+)`", r"\1", " ".join(doc.split()))
    return text.replace("``", "").replace("%", "%%")


def _default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return dataclasses.MISSING


def add_dataclass_flags(
    parser: ArgumentParser,
    cls: type,
    *,
    skip: Sequence[str] = (),
    one_of: Sequence[str] = (),
    one_of_required: bool = False,
    title: str | None = None,
) -> None:
    """Add the fields of the dataclass ``cls`` to ``parser``, following the module's flag rules.

    Args:
        parser: The parser (a jsonargparse ``ArgumentParser``, e.g. :class:`CommandParser`).
        cls: A dataclass; each field's type, default and documentation make its flag.
        skip: Fields left out (given by another dataclass, or not options at all).
        one_of: Fields that exclude each other (added first, as a mutually exclusive group).
        one_of_required: Whether one of ``one_of`` must be given.
        title: Help section of these flags (default: the parser's options).
    """
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    container = parser.add_argument_group(title) if title else parser
    group = parser.add_mutually_exclusive_group(required=one_of_required) if one_of else None
    chosen = [item for item in dataclasses.fields(cls) if item.init and item.name not in skip]
    chosen.sort(key=lambda item: item.name not in one_of)
    for item in chosen:
        action = _add_field(container, item, hints[item.name], _help(docs.get(item.name, "")))
        if group is not None and item.name in one_of:
            group._group_actions.append(action)  # jsonargparse types its flags; argparse checks the exclusion


def _add_field(container: Any, item: dataclasses.Field, hint: Any, text: str) -> Any:
    """Add the flag (or positional argument) of one dataclass field; the argparse action."""
    meta, default = item.metadata, _default(item)
    kwargs: dict[str, Any] = {"help": text}
    if meta.get("metavar"):
        kwargs["metavar"] = meta["metavar"]
    if meta.get("positional"):
        action = container.add_argument(item.name, type=hint, **kwargs)
        action.field_type = hint  # what error messages say it accepts
        return action
    inner = _optional_inner(hint)
    name = item.name
    if inner is bool:
        if not isinstance(default, bool):
            raise ValueError(f"{item.name}: a bool field needs a default (its flag flips it).")
        name = ("no_" if default else "") + item.name
        kwargs["action"] = "store_false" if default else "store_true"
        kwargs["help"] = f"{text} On unless this flag is given." if default else text
    elif typing.get_origin(inner) is list:  # validated element by element
        kwargs.update(type=typing.get_args(inner)[0], nargs="+")
        if meta.get("repeat"):
            kwargs["action"] = "extend"
    else:
        kwargs["type"] = hint
    element = _optional_inner(kwargs.get("type"))
    if typing.get_origin(element) is Literal and "metavar" not in kwargs:  # the choices, also when optional
        kwargs["metavar"] = "{" + ",".join(str(value) for value in typing.get_args(element)) + "}"
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    flags = list(dict.fromkeys([*meta.get("flags", ()), flag_name(name), f"--{name}"]))
    action = container.add_argument(*flags, dest=item.name, **kwargs)
    action.field_type = kwargs.get("type")
    return action


def from_args(cls: type[T], args: Namespace, **values: Any) -> T:
    """The dataclass ``cls`` from the parsed ``args`` (its fields found there), ``values`` taking precedence."""
    found = {item.name: args[item.name] for item in dataclasses.fields(cls) if item.init and item.name in args}
    return cls(**{**found, **values})


@dataclass
class PipelineSource:
    """Where the model comes from: what ``fit`` or ``export`` wrote."""

    ckpt: str | None = field(default=None, metadata={"flags": ("--ckpt", "--ckpt-path", "--ckpt_path")})
    """A ``.ckpt`` file written by fit."""
    pipeline: str | None = None
    """An exported pipeline folder (or hub id)."""
    weights: WeightsName = "ema"
    """With --ckpt: the EMA weights when the run had them (``ema``) or the raw trained ones (``raw``)."""


@dataclass
class SamplingOptions:
    """How the pipeline samples."""

    scheduler: SchedulerName | None = None
    """Sampling scheduler, replacing the pipeline's own (keeping its noise schedule); ``None``: the pipeline's."""
    num_inference_steps: int | None = field(default=None, metadata={"flags": ("--num-inference-steps", "--steps")})
    """Denoising steps; ``None``: the model's."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale, >= 0; 1 disables guidance; ``None``: the model's."""
    seed: int = 0
    """Seed of the initial noise."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""


def load_pipeline(args: Any) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """The pipeline named by ``--ckpt`` or ``--pipeline`` and the sampling defaults it carries.

    ``--pipeline`` loads any diffusers pipeline folder (the class comes from its ``model_index.json``;
    this package's :class:`ClassConditionedPipeline` included); ``--scheduler`` replaces its scheduler,
    keeping the noise schedule. The defaults are ``steps`` and ``guidance_scale``, plus ``image_size``
    when a ``--ckpt`` module records one (see :func:`~diffusion_lightning.modules.loading.load_pipeline_source`).

    Args:
        args: The parsed options: the fields of :class:`PipelineSource` and ``scheduler``.

    Raises:
        SystemExit: With an ``error: ...`` message when the options or the source are not usable.
    """
    if bool(args.ckpt) == bool(args.pipeline):
        raise SystemExit("error: give exactly one of --ckpt FILE or --pipeline DIR.")
    try:
        return load_pipeline_source(
            ckpt=args.ckpt or None, pipeline=args.pipeline or None, weights=args.weights, scheduler=args.scheduler
        )
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from error
