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


LONG_MODEL = "/home/someone/models/stabilityai/stable-diffusion-2-1-base-local-copy-768px/pipeline"


def _row(sid: str, phase: str = "cumulative", preparing=None) -> dict:
    return {"id": sid, "model": LONG_MODEL, "status": "interrupted", "phase": phase, "evaluations": 1234,
            "created_at": "2026-12-02T16:30:42.123456", "preparing": preparing}


def test_search_list_never_cuts_the_id_at_80_columns(monkeypatch):
    """The id is what users copy: whole on one line; the model shows its path's tail instead."""
    console = Console(width=80, record=True)
    monkeypatch.setattr(views, "out", console)
    rows = [_row("79ba786c7e1f"), _row("0123456789ab", "preparing", {"done_bytes": 1234.5e6, "total_bytes": 6789e6})]
    views.print_uncut(views.searches_table(rows, "in /tmp/a/very/long/place/searches.db"))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    for r in rows:
        assert any(r["id"] in line for line in lines), "\n".join(lines)
    tails = [line for line in lines if "79ba786c7e1f" in line]
    assert "…" in tails[0] and "pipeline" in tails[0]  # the model's tail, marked as shortened
    assert LONG_MODEL not in "".join(lines)


def test_short_model_kept_whole(monkeypatch):
    console = Console(width=80, record=True)
    monkeypatch.setattr(views, "out", console)
    row = dict(_row("79ba786c7e1f"), model="tiny-sd")
    views.print_uncut(views.searches_table([row], "in s.db"))
    text = console.export_text()
    assert "tiny-sd" in text and "…" not in text


def test_recipe_and_validation_tables_keep_keys_with_a_long_model(monkeypatch):
    console = Console(width=80, record=True)
    monkeypatch.setattr(views, "out", console)
    info = dict(_info(), model=LONG_MODEL)
    views.print_uncut(views.recipe_table(info))
    v = {"recipe_key": KEYS[0], "mlpackage": "/tmp/out/" + KEYS[0] + ".mlpackage", "size_bytes": 1.5e6,
         "avg_bits": 3.0, "structural_ok": True, "structural_detail": "", "numeric_psnr": None, "numeric_ok": None,
         "runtime": {}, "runtime_note": "not run: needs macOS"}
    views.print_uncut(views.validation_table("Core ML validations", [(v, 30.0)]))
    lines = console.export_text().splitlines()
    assert any("0123456789ab" in line for line in lines)
    for key in KEYS:
        assert any(key in line for line in lines), key


def test_cli_list_and_status_at_80_columns(tmp_path, model_cache):
    """The real `search list` / `search status` at COLUMNS=80 with a long local model path."""
    from search.config import SearchConfig
    from storage import Layer, Storage
    from tests.cli_helpers import run_cli

    db = tmp_path / "s.db"
    storage = Storage(db)
    config = SearchConfig(nbits=(4,), min_size=16, resolution=64)
    sid = storage.create_search(model=LONG_MODEL, model_version=LONG_MODEL, model_location=LONG_MODEL,
                                model_source="local", fingerprint="f" * 64, config=config.to_dict(),
                                config_hash=config.fingerprint(), layers=[Layer("a.weight", 4096, (64, 64), "linear")]).id
    storage.close()
    listed = run_cli("list", "--db", db, model_cache=model_cache, COLUMNS="80")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, listed.stdout
    assert any(sid in line and "…" in line and line.split()[1].endswith("pipeline") for line in lines), listed.stdout
    status = run_cli("status", sid, "--db", db, model_cache=model_cache, COLUMNS="80")
    assert status.returncode == 0, status.stderr
    assert sid in status.stdout.split(), status.stdout  # whole, as one word
