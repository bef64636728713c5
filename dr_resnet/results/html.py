"""report.html: the report as one self-contained page (figures embedded as data URIs, no script or
style from the network), for a browser or an e-mail attachment. dr_resnet.report writes it beside
results.md from the same tables and figures."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from dr_resnet.results.tables import Table, to_html

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1, h2 { font-weight: 600; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.8em; margin: 0.6em 0; }
.wide { overflow-x: auto; } td.nowrap { white-space: nowrap; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, p.note { color: #555; font-size: 0.9em; }
.notrun { color: #a40; } tr.group th { background: #e8eef6; }
"""

# Once loaded, the page notes how many of its figures the browser decoded (body data-figures-shown): a
# check for tests and for anyone who opens the page's source.
ON_LOAD = ("window.addEventListener('load', () => { document.body.dataset.figuresShown = "
           "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length; });")

def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_html(out: Path, title: str, tables: list[Table], figures: list[tuple[Path, str]]) -> Path:
    """out/report.html: the report's tables (tables.py, the same as results.md's) and (figure, caption)s."""
    parts = [f"<h1>{html.escape(title)}</h1>", *(to_html(table) for table in tables), "<h2>Figures</h2>",
             *(_figure(path, caption) for path, caption in figures if path.is_file())]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(parts)}<script>{ON_LOAD}</script></body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
