"""The report page's building blocks: the page and its figures, table and bar helpers, file readers."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

# each <img> records its decoded size, so a headless browser's DOM dump shows it was drawn
IMG_SCRIPT = """<script>
for (const img of document.images) {
  const mark = () => { img.dataset.naturalWidth = img.naturalWidth; };
  img.complete ? mark() : img.addEventListener('load', mark);
}
</script>"""


CSS = """body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}
table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:3px 6px;
vertical-align:top;text-align:left}.hashes td+td{word-break:break-all}
pre{white-space:pre-wrap;background:#f6f6f6;padding:6px}
img{max-width:100%}.missing{color:#777;font-style:italic}details{margin:4px 0}"""


class Page:
    """Collects sections and writes each figure as a PNG beside the page and inline in it."""

    def __init__(self, run_dir: Path, png_dir: Path):
        self.run_dir = run_dir
        self.png_dir = png_dir
        self.parts: list[str] = []

    def figure(self, name: str, draw: Callable[[Any], None], *, size=(6.0, 3.5)) -> str:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers and CI
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=size)
        try:
            draw(ax)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=90)
        finally:
            plt.close(fig)
        png = buf.getvalue()
        self.png_dir.mkdir(parents=True, exist_ok=True)
        (self.png_dir / f"{name}.png").write_bytes(png)
        data = base64.b64encode(png).decode("ascii")
        return f'<img alt="{name}" src="data:image/png;base64,{data}">'


def missing(text: str) -> str:
    return f'<p class="missing">{html.escape(text)}</p>'


def absent(manifests: dict[str, dict], stage: str, what: str) -> str:
    """Why a section part is empty: the stage has not run, or ran without writing `what`."""
    return missing(f"{stage}: {'no ' + what if stage in manifests else 'not run yet'}")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The readable lines of a metrics log (a torn last line from a killed run is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def read_rows(folder: Path, *, columns: list[str] | None = None, limit: int | None = None):
    """Rows of a stage's Parquet shards as plain dicts (nested lists, not numpy arrays)."""
    import pyarrow.parquet as pq

    out: list[dict[str, Any]] = []
    for path in sorted(folder.glob("shard-*.parquet")):
        schema = pq.read_schema(path).names
        cols = [c for c in columns if c in schema] if columns else None
        out.extend(pq.read_table(path, columns=cols).to_pylist())
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def table(header: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><tr>{head}</tr>{body}</table>"


def fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def esc(text: Any) -> str:
    return html.escape(str(text if text is not None else ""))


def bars(page: Page, name: str, counts: dict[str, float], title: str, xlabel: str) -> str:
    def draw(ax):
        names = sorted(counts)
        ax.barh(names, [counts[n] for n in names])
        ax.set(title=title, xlabel=xlabel)

    return page.figure(name, draw, size=(6.0, 1.2 + 0.3 * len(counts)))
