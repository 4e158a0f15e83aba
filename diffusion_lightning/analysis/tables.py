"""Tables and figures of the analyses, written atomically and logged."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image

from diffusion_lightning.loggers.media import log_image
from diffusion_lightning.utils.io import atomic_write_text, save_image, write_json

__all__ = ["Table", "figure_to_pil", "write_analysis"]


@dataclass
class Table:
    """Rows of one analysis, with their columns in order.

    Args:
        name: The analysis (``mse``, ``trajectory``, ``denoising``, ``time``).
        columns: Column names, in order.
        rows: One dict per row.
        meta: Settings and extra values (written to the JSON file beside the rows).
    """

    name: str
    columns: list[str]
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def column(self, name: str) -> list[Any]:
        """The values of one column."""
        return [row.get(name) for row in self.rows]

    def row(self, **match: Any) -> dict[str, Any]:
        """The first row whose values equal ``match``."""
        for row in self.rows:
            if all(row.get(k) == v for k, v in match.items()):
                return row
        raise KeyError(f"no row of {self.name} has {match}.")

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: _cell(v) for k, v in row.items()})
        return buffer.getvalue()

    def to_json(self) -> dict[str, Any]:
        return {"analysis": self.name, "columns": self.columns, "rows": self.rows, **self.meta}


def _cell(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def figure_to_pil(figure: Any) -> PIL.Image.Image:
    """Render a matplotlib figure to an RGB PIL image."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    buffer.seek(0)
    return PIL.Image.open(buffer).convert("RGB")


def write_analysis(
    out: str | Path, table: Table, figure: Any, loggers: Sequence[Any] = (), step: int = 0
) -> dict[str, Path]:
    """Write ``OUT/<name>.csv``, ``.json`` and ``.png`` atomically and log the PNG as ``analysis/<name>``."""
    out = Path(out)
    image = figure_to_pil(figure)
    paths = {
        "csv": atomic_write_text(out / f"{table.name}.csv", table.to_csv()),
        "json": write_json(out / f"{table.name}.json", table.to_json()),
        "png": save_image(image, out / f"{table.name}.png"),
    }
    if loggers:
        log_image(list(loggers), f"analysis/{table.name}", image, step)
    return paths
