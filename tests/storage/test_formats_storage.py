"""Schema v4: palette formats in storage. Grouped formats are stored next to per-tensor ones of the
same layer, and a database written before formats existed (schema v3) is upgraded in place with
every row read back as the per-tensor format it was."""
import sqlite3

from common.formats import PaletteFormat
from storage import Layer, Measurement, PaletteInfo, Storage, StoredRecipe
from storage.migrations import LATEST_VERSION

LAYERS = [Layer("down.0.conv", 4096, (64, 64), "linear")]


def _search(st: Storage):
    return st.create_search(model="m", model_version="m", model_location="/m", model_source="builtin",
                            fingerprint="f" * 64, config={"nbits": [4, "4g16"]}, config_hash="c" * 64,
                            layers=LAYERS, owner="test:1")


def _downgrade_to_v3(path) -> None:
    """The v3 tables exactly: no group_size columns, palettes unique on (search, layer, bits)."""
    con = sqlite3.connect(path)
    con.executescript("""
        ALTER TABLE measurements DROP COLUMN group_size;
        ALTER TABLE palettes RENAME TO p4;
        DROP INDEX ix_palettes_search_id;
        CREATE TABLE palettes (id INTEGER NOT NULL PRIMARY KEY, search_id VARCHAR(32) NOT NULL
            REFERENCES searches (id) ON DELETE CASCADE, layer TEXT NOT NULL, bits INTEGER NOT NULL,
            digest VARCHAR(64) NOT NULL, weight_mse FLOAT NOT NULL, path TEXT NOT NULL,
            UNIQUE (search_id, layer, bits));
        CREATE INDEX ix_palettes_search_id ON palettes (search_id);
        INSERT INTO palettes SELECT id, search_id, layer, bits, digest, weight_mse, path FROM p4;
        DROP TABLE p4;
        PRAGMA user_version=3;
    """)
    con.close()


def test_grouped_and_per_tensor_rows_side_by_side(tmp_path):
    with Storage(tmp_path / "s.db") as st:
        sid = _search(st).id
        for fmt in (PaletteFormat(4), PaletteFormat(4, 16)):
            assert st.add_palette(sid, PaletteInfo("down.0.conv", fmt, "d" + str(fmt), 0.5, f"p{fmt}"))
            st.add_measurement(sid, Measurement(f"isolated/{fmt}/down.0.conv", "isolated", fmt, "down.0.conv", None,
                                                40.0, (40.0,), "n", "w", 0.1))
        st.add_recipe(sid, StoredRecipe("r", "optimal", None, None, {"down.0.conv": PaletteFormat(3, 16)}, 3.1, 0.01,
                                        None, None, None, None, None))
        pals = st.palettes(sid)
        assert set(pals) == {("down.0.conv", 4), ("down.0.conv", PaletteFormat(4, 16))}
        assert pals[("down.0.conv", PaletteFormat(4, 16))].digest == "d4g16"
        assert {m.bits for m in st.measurements(sid)} == {PaletteFormat(4), PaletteFormat(4, 16)}
        assert st.recipes(sid)[0].bits == {"down.0.conv": PaletteFormat(3, 16)}
    row = sqlite3.connect(tmp_path / "s.db").execute("SELECT bits_json FROM recipes").fetchone()
    assert row == ('{"down.0.conv": "3g16"}',)


def test_v3_database_is_upgraded_and_reads_per_tensor(tmp_path):
    path = tmp_path / "v3.db"
    with Storage(path) as st:
        sid = _search(st).id
        st.add_palette(sid, PaletteInfo("down.0.conv", 4, "d4", 0.5, "p4"))
        st.add_measurement(sid, Measurement("isolated/4/down.0.conv", "isolated", 4, "down.0.conv", None, 40.0,
                                            (40.0,), "n", "w", 0.1))
    _downgrade_to_v3(path)
    with Storage(path) as st:  # migrates to v4
        pals = st.palettes(sid)
        assert list(pals) == [("down.0.conv", PaletteFormat(4))] and pals[("down.0.conv", 4)].digest == "d4"
        assert [m.bits for m in st.measurements(sid)] == [PaletteFormat(4)]
        assert st.add_palette(sid, PaletteInfo("down.0.conv", PaletteFormat(4, 16), "g", 0.4, "pg"))  # now allowed
        assert not st.add_palette(sid, PaletteInfo("down.0.conv", 4, "x", 0.1, "x"))  # still unique per format
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
