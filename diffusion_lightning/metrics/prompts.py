"""Prompts for evaluating text-to-image models, and the digit each one asks for.

A prompts file holds one prompt per line; lines starting with ``#`` are ignored (a blank line
between prompts is an error: it reads as an empty prompt), and ``prompt<TAB>class`` gives a
prompt's class explicitly. The digit judge scores a prompt's samples against its class: the
explicit one, else the one digit the prompt names, as a numeral (``7``) or an English word
(``seven``, see :data:`~diffusion_lightning.data.captions.DIGIT_NAMES`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from diffusion_lightning.data.caption_sources import prompt_lines
from diffusion_lightning.data.captions import DIGIT_NAMES

__all__ = ["PromptSet", "digits_in", "prompt_classes", "read_prompts", "shorten"]

_NUMERAL = re.compile(r"(?<![\w.])(\d)(?![\w]|\.\d)")
_WORD = re.compile(r"\b(" + "|".join(DIGIT_NAMES) + r")\b", re.IGNORECASE)

FORMAT = "one prompt per line, optionally 'prompt<TAB>class'; lines starting with # are ignored"


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a prompts file, in file order, and the classes it gives explicitly.

    Args:
        prompts: The prompts.
        classes: ``{prompt: class}`` for the prompts written as ``prompt<TAB>class``.
    """

    prompts: tuple[str, ...]
    classes: dict[str, int] = field(default_factory=dict)


def read_prompts(path: str | os.PathLike[str]) -> PromptSet:
    """Read a prompts file (see the module's documentation for the format).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: naming the line, for an empty prompt, a class that is not an int ``>= 0``, a
            prompt given twice, or a file without prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} does not exist; expected a text file with {FORMAT}.")
    prompts: dict[str, int] = {}
    classes: dict[str, int] = {}
    try:
        lines = prompt_lines(path, "--prompts")
    except ValueError as err:
        raise ValueError(f"{err} Expected {FORMAT}.") from None
    for number, raw in lines:
        where = f"prompts file {str(path)!r}, line {number}"
        prompt, *rest = (part.strip() for part in raw.split("\t"))
        if not prompt:
            raise ValueError(f"{where}: {raw!r} has no prompt before the tab; expected {FORMAT}.")
        if len(rest) > 1:
            raise ValueError(f"{where}: {raw!r} has {len(rest)} tabs; expected 'prompt' or 'prompt<TAB>class'.")
        if prompt in prompts:
            raise ValueError(f"{where}: prompt {prompt!r} was already given on line {prompts[prompt]}; list it once.")
        prompts[prompt] = number
        if rest:
            value = rest[0]
            if not value.isdigit():
                raise ValueError(
                    f"{where}: class={value!r} of prompt {prompt!r} is not accepted; expected an int >= 0 "
                    "after the tab."
                )
            classes[prompt] = int(value)
    return PromptSet(tuple(prompts), classes)


def digits_in(prompt: str) -> list[int]:
    """The distinct digits ``prompt`` names, as numerals or English words, in order of appearance."""
    found = [(m.start(), int(m.group(1))) for m in _NUMERAL.finditer(prompt)]
    found += [(m.start(), DIGIT_NAMES.index(m.group(1).lower())) for m in _WORD.finditer(prompt)]
    return list(dict.fromkeys(digit for _, digit in sorted(found)))


def prompt_classes(
    prompts: Sequence[str], explicit: Mapping[str, int] | None = None, num_classes: int | None = None
) -> list[int]:
    """The class of each prompt for the digit judge: ``explicit[prompt]``, else the one digit it names.

    Args:
        prompts: The prompts.
        explicit: Classes given explicitly (a prompts file's ``prompt<TAB>class`` lines).
        num_classes: The judge's number of classes; a class outside ``0..num_classes-1`` is an error.

    Raises:
        ValueError: naming the prompt and how to fix it, when a prompt names no digit or several and
            has no explicit class, or when its class is outside the judge's classes.
    """
    explicit = explicit or {}
    classes = []
    for prompt in prompts:
        if prompt in explicit:
            value = explicit[prompt]
        else:
            digits = digits_in(prompt)
            if len(digits) != 1:
                what = "names no digit" if not digits else f"names several digits {digits}"
                raise ValueError(
                    f"prompt {prompt!r} {what}, so the digit judge cannot tell which class it asks for (it reads "
                    f"a numeral 0-9 or a word {DIGIT_NAMES[0]!r}..{DIGIT_NAMES[-1]!r}); give its class after a tab "
                    f"in the prompts file ('{prompt}<TAB>3', or prompt_classes in the evaluation config), or drop "
                    "judge from --metrics."
                )
            value = digits[0]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"the class of prompt {prompt!r} is {value!r}; expected an int >= 0.")
        if num_classes is not None and value >= num_classes:
            raise ValueError(
                f"prompt {prompt!r} asks for class {value}, but the digit judge knows classes 0..{num_classes - 1}; "
                "give another class after a tab in the prompts file, or drop judge from --metrics."
            )
        classes.append(value)
    return classes


def shorten(text: str, width: int = 24) -> str:
    """``text`` cut to ``width`` characters with an ellipsis, for captions under small tiles."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."
