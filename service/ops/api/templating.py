"""The Jinja2 environment of the dashboard pages, with the filters every template uses."""
from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

templates = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds // 60:.0f} m {seconds % 60:02.0f} s"
    return f"{seconds / 3600:.1f} h"


def ago(ts: datetime | None, now: datetime) -> str:
    return "–" if ts is None else f"{duration(max((now - ts).total_seconds(), 0.0))} ago"


def short_uid(uid: str) -> str:
    """Long UIDs in narrow columns: head…tail (the full UID is in the title and the drill-down)."""
    return uid if len(uid) <= 26 else f"{uid[:10]}…{uid[-12:]}"


templates.env.filters["duration"] = duration
templates.env.filters["short_uid"] = short_uid
templates.env.globals["ago"] = ago


def sparkline(points: tuple[tuple[float, float], ...], width: int = 260, height: int = 44) -> Markup:
    """A small inline SVG of a lab series over time (x: days before the study, the study at the right end;
    y: the series' own range), for the review page. Built here so the page needs no script or CDN."""
    if not points:
        return Markup("")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span_x = max(max(xs), 1.0)
    lo, hi = min(ys), max(ys)
    span_y = (hi - lo) or 1.0
    coords = [(width - 6 - (x / span_x) * (width - 12), height - 6 - ((y - lo) / span_y) * (height - 12))
              for x, y in points]
    line = " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords)
    dots = "".join(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2"/>' for cx, cy in coords)
    return Markup(f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
                  f'role="img"><polyline points="{line}" fill="none" stroke="#4f46e5" stroke-width="1.5"/>'
                  f'<g fill="#4f46e5">{dots}</g></svg>')


templates.env.globals["sparkline"] = sparkline


_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    """One line of a card document as HTML: escaped, `code` spans kept as <code>."""
    return _CODE.sub(r"<code>\1</code>", str(escape(text)))


def card_html(document: str) -> Markup:
    """A model card document (`inference/card/document.py`: `#`/`##` headings, `- ` items, two-space
    continuation lines, paragraphs) as HTML for the models page. Every piece of text is escaped first."""
    out: list[str] = []
    in_list = False
    for line in document.splitlines():
        if line.startswith("- ") or (in_list and line.startswith("  ") and line.strip()):
            if line.startswith("- "):
                out.append(("</li>" if in_list else "<ul>") + "<li>" + _inline(line[2:]))
            else:  # continues the item above
                out.append("<br>" + _inline(line.strip()))
            in_list = True
            continue
        if in_list:
            out.append("</li></ul>")
            in_list = False
        if line.startswith("## "):
            out.append(f"<h4>{_inline(line[3:])}</h4>")
        elif line.startswith("# "):
            out.append(f"<h3>{_inline(line[2:])}</h3>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    if in_list:
        out.append("</li></ul>")
    return Markup("\n".join(out))


templates.env.filters["card_html"] = card_html
