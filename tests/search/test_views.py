"""The recipe table never cuts a recipe key (users copy it into `search apply --recipe`)."""
from rich.console import Console

from search.cli import views

KEYS = ["recipe_15.79_bit_mixedpalette_optimal2", "recipe_3.00_bit_mixedpalette", "recipe_12.34_bit_mixedpalette_apple"]


def _info():
    recipes = [dict(key=k, strategy="optimal" if "optimal" in k else "apple", avg_bits=16.0 - i, size_mb=1.5,
                    threshold=None if "optimal" in k else 99.5, predicted_psnr=101.25, psnr=100.04)
               for i, k in enumerate(KEYS)]
    return {"id": "0123456789ab", "model": "tiny-sdxl", "baselines": {"original": 210.21, "linear_8bit": 82.89},
            "recipes": recipes}


def test_keys_survive_narrow_terminals(monkeypatch):
    for width in (80, 60, 40):
        console = Console(width=width, record=True)
        monkeypatch.setattr(views, "out", console)
        views.print_uncut(views.recipe_table(_info()))
        text = console.export_text()
        lines = text.splitlines()
        for key in KEYS:
            assert any(key in line for line in lines), (width, key, text)
        assert "…" not in text
        assert any("100.04" in line for line in lines) and any("82.89" in line for line in lines)


def test_fits_80_columns_with_apple_keys(monkeypatch):
    console = Console(width=80, record=True)
    monkeypatch.setattr(views, "out", console)
    info = _info()
    info["recipes"] = [r for r in info["recipes"] if r["key"] == "recipe_3.00_bit_mixedpalette"]
    views.print_uncut(views.recipe_table(info))
    assert max(len(line) for line in console.export_text().splitlines()) <= 80
