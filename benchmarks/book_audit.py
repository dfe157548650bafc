"""Count, from the built HTML, what every chapter page carries: the provenance box (with a commit), folded code,
a CSV beside every figure and table (and that each link resolves), and the launch links to the source notebook.

Usage: python benchmarks/book_audit.py [_build/html] — prints one row per page and exits 1 if a page lacks any of
them. Reads the HTML as text; runs nothing. (The browser checks of `make check-book` open two pages for real.)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PAGES = "book/generated"
NOT_CHAPTERS = {"data"}  # the Data page offers the store itself, no figures of its own


def audit(html: Path) -> dict:
    """What one built page carries, counted from its HTML."""
    text = html.read_text(encoding="utf-8")
    name = html.stem
    figures = re.findall(r'<figure[^>]*id="(fig-[^"]+)"', text)
    tables = re.findall(r'<table id="T_', text)
    links = re.findall(r'href="([^"]+\.csv)"', text)
    csv_names = {Path(link).name for link in links}
    resolved = sum((html.parent / link).resolve().is_file() for link in links)
    commit = re.search(r"from commit <code[^>]*><span[^>]*>([^<]+)</span>", text)
    return {
        "page": name,
        "box": "About this page" in text,
        "commit": commit.group(1) if commit else "",
        "folded": len(re.findall(r'class="cell tag_hide-(?:input|cell)', text)),
        "shown": len(re.findall(r'class="cell docutils container"', text)),  # code cells neither folded nor removed
        "figures": len(figures),
        "figure_csv": sum(f"{f}.csv" in csv_names for f in figures),
        "tables": len(tables),
        "table_csv": sum(n.startswith("tab-") for n in csv_names),
        "links_resolve": f"{resolved}/{len(links)}",
        "launch": f"notebooks%2F{name}.md" in text and f"notebooks/{name}.ipynb" in text,
    }


def complete(row: dict) -> bool:
    """A chapter page is complete when every figure and table has its CSV, every link resolves, and it has the box
    with a commit, folded code and no shown-but-unfolded code cell, and the launch links."""
    done, total = row["links_resolve"].split("/")
    return (
        row["box"]
        and bool(row["commit"])
        and row["folded"] > 0
        and row["shown"] == 0
        and row["figure_csv"] == row["figures"]
        and row["table_csv"] >= row["tables"]
        and done == total
        and row["launch"]
    )


def main(argv=None) -> int:
    root = Path((argv or sys.argv[1:] or ["_build/html"])[0])
    pages = sorted(p for p in (root / PAGES).glob("*.html") if p.stem not in NOT_CHAPTERS)
    if not pages:
        print(f"no built pages under {root / PAGES} (run make book)", file=sys.stderr)
        return 2
    rows = [audit(p) for p in pages]
    columns = list(rows[0])
    print(" | ".join(columns) + " | complete")
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns) + f" | {complete(row)}")
    bad = [r["page"] for r in rows if not complete(r)]
    counts = {k: sum(r[k] for r in rows) for k in ("figures", "figure_csv", "tables", "table_csv")}
    print(
        f"{len(rows)} pages; {counts['figures']} figures with {counts['figure_csv']} CSVs, {counts['tables']} tables "
        f"with {counts['table_csv']} CSVs; incomplete: {', '.join(bad) or 'none'}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
