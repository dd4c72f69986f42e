"""`search status`'s Core ML lines: the phase (recipes applied, validated, failed with why, MB
shipped; or, with target coreai, the Core AI phase whose folders search.cli.coreai_view draws) and
the Resources folders (bundles). Kept beside views.py, which draws the rest of a search and calls
these, so each module has one job; the validation table stays in views.py with the other tables."""
from __future__ import annotations

from rich.markup import escape

from search.cli.console import out


def coreml_line(c: dict) -> None:
    """The Core ML phase of a search: recipes applied, validated, failed (with why), MB shipped."""
    where = f" on {c['node']}" if c.get("node") else ""
    if c.get("target") == "coreai":  # Core AI folders (issue 36): their lines follow (coreai_view)
        out.print(f"Core AI phase {c['status']}{where} (recipes {c['apply']}, node {c['coreml_node']})", highlight=False)
        if c.get("error"):
            out.print(f"[red]Core AI phase error:[/] {escape(c['error'])}", highlight=False, soft_wrap=True)
        return
    out.print(f"Core ML phase {c['status']}{where} (recipes {c['apply']}, node {c['coreml_node']}): applied and "
              f"shipped {c['applied']}/{c['recipes']}, validated {c['validated']}, {c['shipped_mb']:.2f} MB shipped "
              f"to the service", highlight=False, soft_wrap=True)
    for key in c.get("failed", []):
        detail = c["packages"].get(key, {}).get("detail") or "not validated"
        out.print(f"[red]  {escape(key)} failed:[/] {escape(detail)}", highlight=False, soft_wrap=True)
    if c.get("error"):
        out.print(f"[red]Core ML phase error:[/] {escape(c['error'])}", highlight=False, soft_wrap=True)


def bundle_lines(sid: str, bundles: dict) -> None:
    """A search's Resources folders for Apple's Swift pipeline: one line each with its total size
    (bundle.json's) and how it checked; shipped ones can be downloaded."""
    for key, b in bundles.items():
        size = f"{b['total_bytes'] / 1e6:.2f} MB" if b["total_bytes"] else "no folder"
        zipped = f", a {b['zip_bytes'] / 1e6:.2f} MB zip on the service" if b["status"] == "shipped" else ""
        status = f"[red]{b['status']}[/]" if b["status"] == "failed" else b["status"]
        out.print(f"bundle {escape(key)}: {status}, {size}{zipped}; {escape(b['detail'])}", highlight=False,
                  soft_wrap=True)
    if any(b["status"] == "shipped" for b in bundles.values()):
        out.print(f"download: search download {sid} --bundle KEY|all -o DIR", highlight=False, soft_wrap=True)
