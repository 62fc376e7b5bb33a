"""A tiny document model rendered to Markdown and HTML, so report.md and report.html never disagree.

The evaluation report is built once as a list of blocks (heading, paragraph, table, image) and
written in both formats; HTML escapes every text, images are referenced by relative path.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if any(len(r) != len(self.header) for r in self.rows):
            raise ValueError(f"every table row needs {len(self.header)} cells: {self.header}")


@dataclass(frozen=True)
class Image:
    path: str  # relative to the report
    alt: str


Block = Heading | Paragraph | Bullets | Table | Image


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            lines = [
                "| " + " | ".join(_md_cell(h) for h in b.header) + " |",
                "|" + "|".join("---" for _ in b.header) + "|",
                *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows),
            ]
            out.append("\n".join(lines))
        else:
            out.append(f"![{b.alt}]({b.path})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: Sequence[Block], title: str) -> str:
    e = html.escape
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            img = f'<img src="{e(b.path)}" alt="{e(b.alt)}">'
            body.append(f"<figure>{img}<figcaption>{e(b.alt)}</figcaption></figure>")
    style = (
        "body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;"
        "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        "figcaption{font-size:.85rem;color:#555}"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


__all__ = ["Block", "Bullets", "Heading", "Image", "Paragraph", "Table", "to_html", "to_markdown"]
