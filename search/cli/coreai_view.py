"""`search status`'s Core AI section (issue 36), kept beside views.py (which draws the rest): the
same dict locally and from the service (search.read_models.coreai_bundles)."""
from __future__ import annotations

from rich.markup import escape

from search.cli.console import fmt, out


def coreai_lines(sid: str, folders: dict) -> None:
    """A search's Core AI folders (issue 36): per recipe its checks (LUTs bit for bit, runtime PSNR
    vs the search's measured PSNR) and the comparison rows with Apple's 4bit preset."""
    for key, c in folders.items():
        status = f"[red]{c['status']}[/]" if c["status"] == "failed" else c["status"]
        zipped = f", a {c['zip_bytes'] / 1e6:.2f} MB zip on the service" if c["status"] == "shipped" else ""
        luts = "LUTs bit for bit " + ("yes" if c["luts_ok"] else "NO" if c["luts_ok"] is False else "not checked")
        psnr = ("runtime PSNR not measured" if c["runtime_psnr"] is None else
                f"runtime PSNR {c['runtime_psnr']:.2f} dB vs measured {fmt(c['measured_psnr'])} dB"
                + ("" if c["difference_db"] is None else f" ({c['difference_db']:+.2f} dB)")
                + ("" if c.get("floor_psnr") is None else f", float16 floor {c['floor_psnr']:.2f} dB"))
        out.print(f"Core AI {escape(key)}: {status}, {c['total_bytes'] / 1e6:.2f} MB{zipped}; {luts}; {psnr}; "
                  f"{'ok' if c['ok'] else '[red]not ok[/]'}", highlight=False, soft_wrap=True)
        if c["status"] == "failed" or not c["ok"] or c.get("floor_psnr") is not None:  # the floor: how it was judged
            out.print(f"  {escape(c['detail'])}", highlight=False, soft_wrap=True)
        comp = c.get("comparison")
        if comp:
            for r in comp["rows"]:
                out.print(escape(f"  {r['name'][:34]:34} {r['bits_per_weight']:7.3f} bits/weight "
                                 f"{r['asset_bytes'] / 1e6:8.3f} MB {r['psnr']:8.2f} dB"), highlight=False)
            out.print(f"  recipe - Apple 4bit: {comp['delta_db']:+.2f} dB", highlight=False)
    if any(c["status"] == "shipped" for c in folders.values()):
        out.print(f"download: search download {sid} --bundle KEY|all -o DIR", highlight=False, soft_wrap=True)
