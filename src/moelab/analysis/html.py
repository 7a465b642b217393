"""What every HTML report shares: the page shell (self-contained, no external resources) and images embedded as
data URIs. Instruments and studies both use it, so neither reaches into the other for it."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def img(p: Path) -> str:
    """An <img> with the PNG at `p` embedded (the page stays one file)."""
    data = base64.b64encode(p.read_bytes()).decode()
    return f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def page(title: str, body: str, width: int = 1100, text_column: str = "first") -> str:
    """A whole report page: `title` in the tab, `body` as given (HTML); tables right-aligned but for their first
    or last (`text_column`) column, which holds text."""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:{width}px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:{text_column}-child{{text-align:left}}</style></head><body>
{body}
</body></html>"""


def save_png(fig, path: Path, dpi: int = 100, **savefig_kw) -> Path:
    """`fig` laid out tightly, written to `path` as PNG and closed (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi, **savefig_kw)
    plt.close(fig)
    return path
