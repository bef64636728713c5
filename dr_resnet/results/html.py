"""report.html: the report as one page (no script or style from the network), for a browser or an e-mail
attachment. dr_resnet.report writes it beside results.md from the same tables and figures, in the same
order; tables marked as details (a row per run) are folded. The figures are embedded as data URIs up to a
budget (EMBEDDED_BYTES: the report's own figures stay well within it at 200 runs), so the page stays a few
MB; any beyond it (a gallery per run) are linked as the files beside the page, which the browser shows all
the same while the page and its folder stay together."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from dr_resnet.results.tables import Table, to_html

# The figures embedded in the page, in all (base64 adds a third): past it, a figure is linked instead.
EMBEDDED_BYTES = 3_000_000

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1, h2 { font-weight: 600; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.6em 0; }
.wide { overflow-x: auto; } td.nowrap { white-space: nowrap; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
details > summary { cursor: pointer; } details > summary h2 { display: inline-block; margin-right: 0.6em; }
summary .rows { color: #555; font-size: 0.9em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, p.note { color: #555; font-size: 0.9em; }
.notrun { color: #a40; } tr.group th { background: #e8eef6; }
"""

# Once loaded, the page notes how many of its figures the browser decoded (body data-figures-shown): a
# check for tests and for anyone who opens the page's source.
ON_LOAD = ("window.addEventListener('load', () => { document.body.dataset.figuresShown = "
           "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length; });")


def _figure(path: Path, caption: str, out: Path, embed: bool) -> str:
    alt = html.escape(caption)
    if embed:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return (f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
                f"<figcaption>{alt}</figcaption></figure>")
    href = html.escape(Path(os.path.relpath(path, out)).as_posix())
    return (f'<figure><a href="{href}"><img alt="{alt}" src="{href}"></a>'
            f"<figcaption>{alt} (linked: {href}, beside this page)</figcaption></figure>")


def write_html(out: Path, title: str, tables: list[Table], figures: list[tuple[Path, str]],
               embedded_bytes: int = EMBEDDED_BYTES) -> Path:
    """out/report.html: the report's tables (tables.py, the same as results.md's, in its order) and (figure,
    caption)s, each embedded while the embedded figures stay within `embedded_bytes`, else linked."""
    parts = [f"<h1>{html.escape(title)}</h1>", *(to_html(table) for table in tables), "<h2>Figures</h2>"]
    budget = embedded_bytes
    for path, caption in figures:
        if not path.is_file():
            continue
        size = path.stat().st_size
        parts.append(_figure(path, caption, out, size <= budget))
        if size <= budget:
            budget -= size
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}<script>{ON_LOAD}</script></body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
