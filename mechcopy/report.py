"""One standalone, offline HTML report: text, PNG figures, circuitsvis views, tables, metadata.

Everything is inside the file: figures as base64 `data:` URIs, circuitsvis' script once in the
head (each view then only calls `CircuitsVis.render`), tables as HTML. A Content-Security-Policy
forbids the page every network request, so it opens the same on an air-gapped machine and
cannot leak anything when opened on a connected one.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from mechcopy.sites import write_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Inline scripts and styles, data: images; nothing from anywhere else (no fetch, no fonts, no frames).
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #222; background: #fff; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em 3em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
nav ol { columns: 2; font-size: 0.95em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #666; }
table.data { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
table.data th { background: #f4f4f4; }
.view { border: 1px solid #eee; padding: 0.3em 0.8em; margin: 1em 0; overflow-x: auto; }
footer { margin-top: 3em; border-top: 1px solid #ddd; font-size: 0.85em; color: #444; }
footer table td { vertical-align: top; padding: 0.15em 0.8em 0.15em 0; }
pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; margin: 0; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


@dataclass(frozen=True)
class Section:
    """One section of the report.

    `text`: plain paragraphs separated by blank lines; lines starting with "- " form a list;
    `code` and **bold** are honoured. `figures`: PNG paths. `html`: raw HTML snippets, e.g. a
    `mechcopy.viz.CircuitsvisHTML` (or its `local_src`; the inlined circuitsvis script is then
    shared, not repeated). `table`: a DataFrame shown as an HTML table.
    """

    title: str
    text: str = ""
    figures: Sequence[str | Path] = field(default_factory=list)
    html: Sequence[Any] = field(default_factory=list)
    table: pd.DataFrame | None = field(default=None, compare=False)


def _inline(text: str) -> str:
    s = html.escape(text)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


def text_to_html(text: str) -> str:
    """Blank-line separated paragraphs; "- " lines become a list. Everything is escaped."""
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if not lines:
            continue
        if all(ln.lstrip().startswith("- ") for ln in lines):
            out.append("<ul>" + "".join(f"<li>{_inline(ln.lstrip()[2:])}</li>" for ln in lines) + "</ul>")
        else:
            out.append(f"<p>{_inline(' '.join(ln.strip() for ln in lines))}</p>")
    return "\n".join(out)


def png_data_uri(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"report figure {path} does not exist; save it first (mechcopy.viz.save_figure)")
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise ValueError(f"report figure {path} is not a PNG file; the report embeds PNGs only")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _library_variants() -> list[str]:
    """circuitsvis' script as our views and as circuitsvis' own `local_src` inline it."""
    import circuitsvis

    from mechcopy.viz import circuitsvis_library

    raw = (Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js").read_text(encoding="utf-8")
    return [raw.replace("</script>", ""), circuitsvis_library()]


def html_item(item: Any) -> tuple[str, bool]:
    """(HTML for one `Section.html` entry, whether it needs circuitsvis' script on the page)."""
    from mechcopy.viz import CircuitsvisHTML

    if isinstance(item, CircuitsvisHTML):
        return item.snippet(include_library=False), True
    if not isinstance(item, str):
        item = getattr(item, "local_src", None) or item._repr_html_()
    needs_library = False
    if "CircuitsVis.render(" in item:
        # circuitsvis writes `<div id=.../>`, which HTML parses as an unclosed div.
        item = re.sub(r'(<div id="circuits-vis-[^"]*"[^>]*?)\s*/>', r"\1></div>", item)
        for lib in _library_variants():
            if lib in item:
                # The module script keeps its `CircuitsVis.render(...)` call, now using the page's copy.
                item, needs_library = item.replace(lib, ""), True
                break
    if re.search(r"""(src|href|from)\s*=?\s*["'](https?:)?//""", item):
        raise ValueError("this HTML snippet loads a script or resource from the network (for circuitsvis: "
                         "str(view) or show_code() use a CDN); pass the view itself or view.local_src "
                         "to keep the report offline")
    return item, needs_library


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="data", na_rep="",
                      float_format=lambda v: f"{v:.4g}", escape=True)


def _meta_html(meta: dict) -> str:
    rows = []
    for key, value in meta.items():
        if isinstance(value, (dict, list, tuple)):
            shown = f"<pre>{html.escape(json.dumps(value, indent=1, default=str))}</pre>"
        else:
            shown = html.escape(str(value))
        rows.append(f"<tr><td><strong>{html.escape(str(key))}</strong></td><td>{shown}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _anchor(i: int, title: str) -> str:
    return f"s{i}-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]


def render_report(title: str, sections: Sequence[Section], meta: dict | None = None) -> str:
    """The report's HTML text (see `write_report`)."""
    meta = dict(meta or {})
    meta.setdefault("generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    need_library = False
    body = []
    for i, sec in enumerate(sections):
        parts = [f'<section id="{_anchor(i, sec.title)}"><h2>{html.escape(sec.title)}</h2>']
        if sec.text:
            parts.append(text_to_html(sec.text))
        for fig in sec.figures:
            name = html.escape(Path(fig).name)
            parts.append(f'<figure><img class="figure" alt="{name}" src="{png_data_uri(fig)}">'
                         f"<figcaption>{name}</figcaption></figure>")
        for item in sec.html:
            snippet, lib = html_item(item)
            need_library |= lib
            parts.append(f'<div class="view">{snippet}</div>')
        if sec.table is not None:
            parts.append(_table_html(sec.table))
        parts.append("</section>")
        body.append("\n".join(parts))
    toc = "".join(f'<li><a href="#{_anchor(i, s.title)}">{html.escape(s.title)}</a></li>'
                  for i, s in enumerate(sections))
    library = ""
    if need_library:
        from mechcopy.viz import circuitsvis_library

        library = f"<script>\n{circuitsvis_library()}\n</script>"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head>\n<meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n{library}\n</head>\n<body><main>\n"
        f"<h1>{html.escape(title)}</h1>\n<nav><ol>{toc}</ol></nav>\n" + "\n".join(body)
        + f"\n<footer><h3>Run details</h3>{_meta_html(meta)}</footer>\n</main></body></html>\n"
    )


def write_report(path: str | Path, title: str, sections: Sequence[Section], meta: dict | None = None) -> Path:
    """Write ONE standalone HTML file (atomically) and return its path.

    `meta` (model fingerprint, git revision, settings, ...) goes in the footer.
    """
    return write_atomic(path, render_report(title, sections, meta))
