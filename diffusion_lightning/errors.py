"""What the command line reports as a mistake in its input: one ``error:`` line, not a traceback.

``diffusion-lightning`` (:func:`diffusion_lightning.cli.main`) ends a command that fails on what it
was given with one ``error: ...`` line on stderr, at most one ``hint: ...`` line after it, and exit
code :data:`USAGE_EXIT_CODE` (2, as argparse uses for usage errors). Anything else is a bug and
keeps Python's traceback (exit code 1). ``--traceback`` anywhere on the command line, or the
environment variable ``DIFFUSION_LIGHTNING_TRACEBACK=1``, prints the traceback of a mistake too.

The rule (:func:`user_error`); a failure is the user's mistake when it is

- a ``SystemExit`` whose message starts with ``error:`` -- what the command parsers
  (:class:`OneLineErrors`) and the commands raise for a flag, a value or a file they refuse;
- a :class:`UserError`, wherever it is raised (code outside this package may raise it too);
- Lightning's ``MisconfigurationException`` (a Trainer or callback configured wrongly);
- an ``OSError`` that names a path (``filename``): the system refused a file or folder it was given
  (a folder under a regular file, a missing or unwritable path);
- a ``ValueError``, ``KeyError``, ``FileNotFoundError`` or ``FloatingPointError`` (a run whose loss
  became non-finite: it stops and says what to change) that this package raises on purpose -- its
  traceback ends at a ``raise`` statement in the package's code. The package's convention is that
  such an error names the field, the value given and what is accepted. The same error wrapped by
  jsonargparse while it builds the classes of a config (a ``ValueError`` raised from it) counts
  too, with the package's message. The same types raised anywhere else (inside torch, say), or
  failing without a ``raise`` (a dictionary lookup, ``int("x")``), are bugs.

An error message is one line: its whitespace (newlines included) collapses to single spaces.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import inspect
import linecache
import os
import re
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "ENV_VAR",
    "TRACEBACK_FLAG",
    "TRACEBACK_HINT",
    "USAGE_EXIT_CODE",
    "OneLineErrors",
    "Report",
    "UserError",
    "UserExit",
    "close_match",
    "one_line",
    "parser_message",
    "pop_traceback_flag",
    "report",
    "traceback_requested",
    "user_error",
]

#: Environment variable that, set to ``1`` (or ``true``, ``yes``, ``on``), prints the traceback of a mistake too.
ENV_VAR = "DIFFUSION_LIGHTNING_TRACEBACK"
#: Command-line flag, accepted anywhere, that prints the traceback of a mistake too.
TRACEBACK_FLAG = "--traceback"
#: Exit code of a command stopped by a mistake in its input (argparse's code for usage errors).
USAGE_EXIT_CODE = 2
#: The hint printed after a mistake found while the command ran (not by a parser).
TRACEBACK_HINT = f"hint: add {TRACEBACK_FLAG} (or set {ENV_VAR}=1) to see where it was raised."

_PACKAGE = Path(__file__).resolve().parent
_SEARCHED = (ValueError, KeyError, FileNotFoundError, FloatingPointError)


class UserError(ValueError):
    """A mistake in what the user gave (a value, a file, a config key), reported as one line.

    The message names the field, the value given and what is accepted. Any code a command runs
    (a data module of another package, say) may raise it to be reported like the package's own.
    """


class UserExit(SystemExit):
    """Ends a command stopped by a mistake: exit code :data:`USAGE_EXIT_CODE`; ``str()`` is the text reported.

    Args:
        message: The ``error:`` line.
        hint: The ``hint:`` line, if any.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        lines = [message] if hint is None else [message, hint]
        super().__init__("\n".join(lines))
        self.code = USAGE_EXIT_CODE
        self.message, self.hint = message, hint


@dataclass(frozen=True)
class Report:
    """A mistake as it is reported: the ``error:`` line and an optional ``hint:`` line (both with their prefix)."""

    message: str
    hint: str | None = None


def one_line(text: Any) -> str:
    """``text`` (or an error's message) with all whitespace, newlines included, collapsed to single spaces."""
    return " ".join(str(text).split())


def _message(error: BaseException) -> str:
    """The message of ``error`` as one line (a ``KeyError``'s without the quotes ``str()`` adds)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return one_line(error.args[0])
    return one_line(error)


def _raised_on_purpose(error: BaseException) -> bool:
    """Whether the traceback of ``error`` ends at a ``raise`` statement in this package's code."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    try:
        inside = Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False
    return inside and linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def _path(name: Any) -> str:
    """A path (or file descriptor) an ``OSError`` names, quoted."""
    return repr(os.fspath(name) if isinstance(name, (str, bytes, os.PathLike)) else name)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from (``raise ... from``), outermost first."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _split(text: str) -> Report:
    """A ``SystemExit`` message (``error: ...`` and an optional ``hint: ...`` line) as a :class:`Report`."""
    error, _, hint = text.partition("\nhint:")
    return Report(one_line(error), f"hint: {one_line(hint)}" if hint.strip() else None)


def user_error(error: BaseException) -> Report | None:
    """How ``error`` is reported when it is a mistake in the input (see the module's rule); ``None`` for a bug."""
    if isinstance(error, SystemExit):
        code = error.code
        if isinstance(code, str) and code.startswith("error:") and not isinstance(error, UserExit):
            return _split(code)
        return None
    if isinstance(error, UserError):
        return Report(f"error: {_message(error)}", TRACEBACK_HINT)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(error, MisconfigurationException):
        return Report(f"error: {_message(error)}", TRACEBACK_HINT)
    if isinstance(error, OSError) and error.filename is not None:
        paths = " -> ".join(_path(name) for name in (error.filename, error.filename2) if name is not None)
        return Report(f"error: {error.strerror or _message(error)}: {paths}", TRACEBACK_HINT)
    if not isinstance(error, _SEARCHED):
        return None
    for cause in _causes(error):
        if isinstance(cause, UserError) or (isinstance(cause, _SEARCHED) and _raised_on_purpose(cause)):
            return Report(f"error: {_message(cause)}", TRACEBACK_HINT)
    return None


def traceback_requested(environ: dict[str, str] | None = None) -> bool:
    """Whether :data:`ENV_VAR` asks for tracebacks (``1``, ``true``, ``yes`` or ``on``)."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def pop_traceback_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without :data:`TRACEBACK_FLAG` (before a ``--`` separator), and whether it was there."""
    args = list(argv)
    end = args.index("--") if "--" in args else len(args)
    kept = [arg for arg in args[:end] if arg != TRACEBACK_FLAG] + args[end:]
    return kept, len(kept) != len(args)


def report(found: Report, error: BaseException, show_traceback: bool = False) -> UserExit:
    """Print ``found`` on stderr (after the traceback of ``error`` when asked) and the ``SystemExit`` to raise."""
    if show_traceback:
        traceback.print_exception(error)
    lines = [found.message] if found.hint is None else [found.message, found.hint]
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    return UserExit(found.message, found.hint)


# ---------------------------------------------------------------------- parser messages

_WORDS = {
    "int": "an int",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "NoneType": "null",
    "tuple": "a list",
    "list": "a list",
    "dict": "a mapping",
}
_TYPE = re.compile(r"typing\.Literal\[([^\]]*)\]|<class '([\w.]+)'>")
#: The longest value quoted in a message (a nested config's value is cut).
_VALUE_CHARS = 80


def _accepted(text: str) -> str | None:
    """What the types named in a jsonargparse message accept, in words (``one of: a, b or null``)."""
    subtypes = re.search(r"Subtypes: (\[.*?\])\s*\n\s*Errors:", text, re.S)
    scope = subtypes.group(1) if subtypes else " ".join(re.findall(r"Expected a (.*?)(?:\. Got value|\n|$)", text))
    values: list[str] = []
    words: list[str] = []
    for match in _TYPE.finditer(scope):
        if match.group(1) is not None:
            try:
                values += [str(value) for value in ast.literal_eval(f"[{match.group(1)}]")]
            except (ValueError, SyntaxError):
                values.append(match.group(1))
        else:
            name = match.group(2).rsplit(".", 1)[-1]
            words.append(_WORDS.get(name, f"a {name}"))
    parts = (["one of: " + ", ".join(dict.fromkeys(values))] if values else []) + list(dict.fromkeys(words))
    return " or ".join(parts) or None


def _quoted(value: str) -> str:
    value = value.strip()
    return repr(value if len(value) <= _VALUE_CHARS else value[: _VALUE_CHARS - 3] + "...")


def parser_message(message: str) -> str:
    """A jsonargparse error message as one line that names the key, the value given and what is accepted.

    ``Parser key "trainer.max_epochs": Does not validate against any of the Union subtypes ...`` becomes
    ``trainer.max_epochs 'abc' is not accepted; expected an int or null.``; a class path that does not
    import, or a config file that does not exist, is said so; other messages are kept, on one line.
    """
    key = re.match(r'\s*Parser key "([^"]+)"(?: element \d+)?:\s*', message)
    if key is None:
        return one_line(message)
    name, body = key.group(1), message[key.end() :]
    missing = re.search(r"File does not exist: (.*)", body)
    if missing is not None:
        return f"{name} file {one_line(missing.group(1))} does not exist."
    problem = re.search(r"Problem with given class_path '([^']+)':\s*(.+?)(?=\n\s*- |\n\s*Given value|\Z)", body, re.S)
    if problem is not None:
        inner = re.match(r'Parser key "([^"]+)"', problem.group(2))
        if inner is not None:  # a value of the class's arguments: named as a key of this one
            return parser_message(f'Parser key "{name}.init_args.{inner.group(1)}"' + problem.group(2)[inner.end() :])
        unknown = re.match(r"Option '([^']+)' is not accepted", problem.group(2))
        if unknown is not None:
            return f"{name}.init_args.{unknown.group(1)} is not accepted: {problem.group(1)} has no such argument."
        return f"{name} {problem.group(1)!r} is not accepted ({one_line(problem.group(2))})."
    given = re.findall(r"(?:Got value|Given value): (.*)", body)
    accepted = _accepted(body)
    if given and accepted:
        return f"{name} {_quoted(given[-1])} is not accepted; expected {accepted}."
    return f"{name}: {one_line(body)}"


def close_match(name: str, candidates: Sequence[str]) -> str | None:
    """The candidate closest to a misspelled ``name`` (as ``difflib`` sees it), if any is close."""
    matches = difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=1, cutoff=0.75)
    return matches[0] if matches else None


def _init_arguments(class_path: str) -> list[str]:
    """The ``__init__`` argument names of the class ``class_path`` and its bases (none when it does not import)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        classes = [klass for klass in inspect.getmro(cls) if klass is not object]
    except Exception:  # only a hint: a class that does not resolve has none
        return []
    names: list[str] = []
    for klass in classes:
        try:
            names += [p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")]
        except (TypeError, ValueError):
            continue
    return names


class OneLineErrors:
    """Mixin for jsonargparse parsers: a mistake ends the command with one ``error: ...`` line.

    Instead of the usage block and a multi-line type report, :meth:`error` raises ``SystemExit``
    with one line (:meth:`one_line_error`, by default :func:`parser_message`) and, for an unknown
    option close to a known one, a ``hint: did you mean ...?`` line. A parser made with
    ``exit_on_error=False`` raises ``ArgumentError`` as jsonargparse does.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Raise ``SystemExit`` with the one-line form of ``message`` (and a hint when one helps)."""
        if not getattr(self, "exit_on_error", True):
            super().error(message, ex)  # type: ignore[misc]
        text = f"error: {self.one_line_error(message)}"
        hint = self.error_hint(message)
        raise SystemExit(text if hint is None else f"{text}\nhint: {hint}") from ex

    def one_line_error(self, message: str) -> str:
        """``message`` as one line naming the key, the value and what is accepted."""
        return parser_message(message)

    def error_hint(self, message: str) -> str | None:
        """``did you mean --x?`` for an unknown option (or config key) close to one of this parser's."""
        argument = re.search(
            r"Parser key \"([^\"]+)\".*class_path '([^']+)':\s*Option '([^']+)' is not accepted", message, re.S
        )
        if argument is not None:  # an init argument the class does not have
            key, class_path, name = argument.groups()
            match = close_match(name, _init_arguments(class_path))
            return None if match is None else f"did you mean {key}.init_args.{match}?"
        unknown = re.search(r"(?:does not accept option|Option) '([^']+)'", message) or re.search(
            r"unrecognized arguments: (-\S+)", message
        )
        if unknown is None:
            return None
        name = unknown.group(1)
        dashes = "--" if name.startswith("--") else ""
        options = [option.lstrip("-") for option in self._known_options()]
        match = close_match(name.lstrip("-"), options)
        return None if match is None else f"did you mean {dashes}{match}?"

    def _known_options(self) -> list[str]:
        """The option strings of this parser and of its subcommands' parsers (and their keys)."""
        found: list[str] = []
        parsers = [self]
        while parsers:
            parser = parsers.pop()
            for action in getattr(parser, "_actions", ()):
                found += [option for option in action.option_strings if option.startswith("--")]
                if isinstance(action, argparse._SubParsersAction):
                    parsers += list(action.choices.values())
        return found
