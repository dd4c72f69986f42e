"""`search status` / GET /searches/{id} while the evaluation-floor probes are still running.

With several evaluators a 4-ulp probe can be stored before any 1-ulp one; the status read then
raised ValueError, which the service turns into an HTTP 500 (a likely cause of the one 500 the
multi-node test hit on a fresh clone; its logs were gone). Real SQLite storage, the real read model."""
import math

import pytest

from search.read_models import eval_floor
from storage import Layer, Measurement, Storage

LAYERS = [Layer("down.0.conv", 4096, (64, 64, 1, 1), "conv"), Layer("mid.attn.to_q", 8192, (128, 64), "linear")]


def _probe(layer, ulps, db):
    key = f"floor/{layer}" + (f"/x{ulps}" if ulps != 1 else "")
    return Measurement(key, "floor", None, layer, ulps if ulps != 1 else None, db, (db, db), "node", "w", 0.1)


def test_status_floor_while_only_a_4_ulp_probe_is_stored(tmp_path):
    with Storage(tmp_path / "s.db") as st:
        s = st.create_search(model="m", model_version="m", model_location="/m", model_source="builtin",
                             fingerprint="f" * 64, config={"nbits": [4]}, config_hash="c" * 64, layers=LAYERS,
                             owner="test:1")
        assert eval_floor(st, s) is None  # no probe yet
        st.add_measurement(s.id, _probe("down.0.conv", 4, 70.0))
        assert eval_floor(st, s) is None  # the 4-ulp probe alone defines no floor
        st.add_measurement(s.id, _probe("down.0.conv", 1, 82.0))
        floor = eval_floor(st, s)
        # reference by hand: powers p1 = 10^-8.2, p4 = 10^-7; (16 p1 - p4) / 15 kept within [0, p1]
        p1, p4 = 10 ** -8.2, 10 ** -7.0
        expect = min(max((16 * p1 - p4) / 15, 0.0), p1)
        assert floor["probes"] == 2
        if expect > 0:
            assert floor["psnr"] == pytest.approx(-10 * math.log10(expect), abs=1e-9)
        else:
            assert floor["psnr"] is None
