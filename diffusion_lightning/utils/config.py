"""Class paths and config sections read the way LightningCLI reads them, through jsonargparse.

``fit`` resolves ``class_path``/``init_args`` with jsonargparse; the helpers here go through the
same machinery, so an import path, a subclass check or a wrong ``init_args`` value fails with the
library's own message wherever the package meets a class path outside the command line.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser

__all__ = ["load_datamodule_config", "resolve_class"]

T = TypeVar("T")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _instantiate(parser: ArgumentParser, config: Any) -> Any:
    """``parser.instantiate`` (jsonargparse >= 4.49), else the ``instantiate_classes`` it replaces."""
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    return instantiate(config)


def resolve_class(class_path: str, base: type[T], field: str = "class_path") -> type[T]:
    """The class that the dotted import path ``class_path`` names, checked to be ``base`` or a subclass.

    The path is parsed as a ``type[base]`` argument by jsonargparse, as LightningCLI parses a
    ``class_path``.

    Args:
        class_path: A dotted import path, e.g. ``lightning.pytorch.loggers.TensorBoardLogger``.
        base: The class the result must derive from.
        field: What holds the path, for the error message.

    Raises:
        ValueError: When the path does not import or names no subclass of ``base``.
    """
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--cls", type=type[base])  # type: ignore[valid-type]
    try:
        return parser.parse_object({"cls": class_path}).cls
    except (argparse.ArgumentError, ImportError, AttributeError) as error:
        raise ValueError(
            f"{field}={class_path!r} does not name an importable subclass of {base.__module__}.{base.__qualname__} "
            f"({_one_line(error)})."
        ) from error


def load_datamodule_config(path: str | os.PathLike[str]) -> LightningDataModule:
    """The data module of the ``data:`` section of a YAML config, built as ``fit`` builds it.

    The section (``class_path`` plus optional ``init_args``) goes through a
    :class:`~lightning.pytorch.cli.LightningArgumentParser` with the data-module group of
    LightningCLI, so short class names, type checks of ``init_args`` and their errors are the
    library's. Other sections of the file (``model``, ``trainer``, ...) are ignored.

    Args:
        path: A YAML file, e.g. a ``fit`` config.

    Raises:
        FileNotFoundError: When ``path`` does not exist.
        ValueError: When the file has no ``data:`` section with a ``class_path``, or the section
            does not parse or build.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist.")
    try:
        config = yaml.safe_load(source.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"config {str(path)!r} is not valid YAML ({_one_line(error)}).") from error
    data = config.get("data") if isinstance(config, dict) else None
    if not (isinstance(data, str) or (isinstance(data, dict) and data.get("class_path"))):
        raise ValueError(
            f"config {str(path)!r} has no data section with a class_path; expected 'data: {{class_path: ..., "
            "init_args: {...}}}' naming a LightningDataModule."
        )
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True, required=True)
    try:
        return _instantiate(parser, parser.parse_object({"data": data})).data
    except argparse.ArgumentError as error:
        raise ValueError(f"config {str(path)!r}: the data section does not parse:\n{error}") from error
