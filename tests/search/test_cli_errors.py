"""Bad input: one clear line, non-zero exit, no traceback, and the database left alone."""
import hashlib
import sqlite3

import pytest

from tests.cli_helpers import error_line, run_cli


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("args, expected", [
    (["--nbits", "3"], "unsupported bit depth(s) 3"),
    (["--nbits", "4,x"], "'x' is not an integer"),
    (["--nbits", "4,4"], "twice"),
    (["--nbits", "4g16"], "--formats takes grouped formats"),
    (["--formats", "4g0"], "--formats: group size 0 must be a positive integer"),
    (["--formats", "5"], "--formats: bits 5 is not a palette depth"),
    (["--formats", "4g"], "--formats: '4g' is not a palette format"),
    (["--formats", "x"], "--formats: 'x' is not a palette format"),
    (["--formats", "4,4g16", "--nbits", "4"], "give --formats or --nbits, not both"),
    (["--formats", "4g16,4g16"], "twice"),
    (["--num-recipes", "0"], "--num-recipes"),
    (["--resolution", "60"], "multiple of 8"),
    (["--steps", "0"], "steps"),
    (["--workers", "0"], "--workers"),
    (["--precision", "double"], "precision"),
    (["--refine-evals", "-1"], "--refine-evals"),
])
def test_bad_options(tmp_path, model_cache, args, expected):
    db = tmp_path / "s.db"
    proc = run_cli("submit", "--model", "tiny-sdxl", "--db", db, *args, model_cache=model_cache)
    assert proc.returncode == 2
    assert expected in error_line(proc)
    assert not db.exists()


@pytest.mark.parametrize("model, expected", [
    ("./no/such/dir", "does not exist"),
    ("not a repo id!", "unknown model"),
    ("nobody-xyz/not-cached-model", "not in the local Hugging Face cache"),
])
def test_unusable_models(tmp_path, model_cache, model, expected):
    db = tmp_path / "s.db"
    proc = run_cli("submit", "--model", model, "--db", db, model_cache=model_cache)
    assert proc.returncode == 2
    line = error_line(proc)
    assert expected in line and model.strip("./") in line
    assert not db.exists()


def test_not_a_pipeline_directory(tmp_path, model_cache):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"x")
    proc = run_cli("submit", "--model", tmp_path / "weights", "--db", tmp_path / "s.db", model_cache=model_cache)
    assert proc.returncode == 2 and "model_index.json" in error_line(proc)


def test_foreign_database_is_untouched(tmp_path, model_cache):
    db = tmp_path / "other.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    con.execute("INSERT INTO invoices VALUES (1, 9.5)")
    con.commit()
    con.close()
    before = sha(db)
    for args in (["submit", "--model", "tiny-sdxl"], ["list"], ["status", "abc"]):
        proc = run_cli(*args, "--db", db, model_cache=model_cache)
        assert proc.returncode == 2 and "another application" in error_line(proc)
    assert sha(db) == before


def test_text_file_as_database(tmp_path, model_cache):
    db = tmp_path / "notes.txt"
    db.write_text("my notes\n" * 50)
    before = sha(db)
    proc = run_cli("list", "--db", db, model_cache=model_cache)
    assert proc.returncode == 2 and "not an SQLite database" in error_line(proc)
    assert sha(db) == before


def test_unknown_search_and_bad_outputs(tmp_path, model_cache):
    from storage import Storage

    db = tmp_path / "s.db"
    Storage(db).close()  # a database without that search (a missing file: tests/search/test_cli_trial_fixes.py)
    proc = run_cli("status", "deadbeef", "--db", db, model_cache=model_cache)
    assert proc.returncode == 2 and "no search 'deadbeef'" in error_line(proc)
    proc = run_cli("download", "deadbeef", "-o", tmp_path / "r.json", "--db", db, model_cache=model_cache)
    assert proc.returncode == 2 and not (tmp_path / "r.json").exists()
    proc = run_cli("plot", "deadbeef", "-o", tmp_path / "p.jpg", "--db", db, model_cache=model_cache)
    assert proc.returncode == 2 and ".png" in error_line(proc)
    proc = run_cli("resume", "deadbeef", "--db", db, model_cache=model_cache)
    assert proc.returncode == 2 and "no search" in error_line(proc)


def test_prompts_file_errors(tmp_path, model_cache):
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    proc = run_cli("submit", "--model", "tiny-sdxl", "--prompts", empty, "--db", tmp_path / "s.db",
                   model_cache=model_cache)
    assert proc.returncode == 2 and "has no prompts" in error_line(proc)
    proc = run_cli("submit", "--model", "tiny-sdxl", "--prompts", tmp_path / "missing.txt", "--db",
                   tmp_path / "s.db", model_cache=model_cache)
    assert proc.returncode == 2 and "cannot read prompts file" in error_line(proc)


def test_recipe_bad_refine_evals(tmp_path, model_cache):
    db = tmp_path / "s.db"
    proc = run_cli("recipe", "deadbeef", "--bits", "4", "--refine-evals", "-3", "--db", db, model_cache=model_cache)
    assert proc.returncode == 2 and "--refine-evals must be 0 (one-shot) or more, got -3" in error_line(proc)
    assert not db.exists()


@pytest.mark.parametrize("command", [["recipe", "deadbeef", "--bits", "4"], ["resume", "deadbeef"]])
def test_zero_workers_is_refused_before_anything_runs(tmp_path, model_cache, command):
    """`--workers 0` once fell back silently to the default pool in `recipe` and `resume`."""
    db = tmp_path / "s.db"
    proc = run_cli(*command, "--workers", "0", "--db", db, model_cache=model_cache)
    assert proc.returncode == 2 and "--workers must be at least 1, got 0" in error_line(proc)
    assert not db.exists()
