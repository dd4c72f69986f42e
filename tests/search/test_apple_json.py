"""Apple-format writing and recipe-file parsing."""

import json
import math

import numpy as np
import pytest

from search.recipes.apple_json import (
    JSON_INF_PSNR,
    UNNAMED_RECIPE,
    RecipeFileError,
    SearchReport,
    parse_recipe_file,
    to_apple_json,
)
from search.recipes.apple_rule import apple_recipes, make_recipe

SIZES = {"down.0": 100, "mid.attn": 200, "up.1": 300}
CUM = {
    1: {"down.0": 40.0, "mid.attn": 30.0, "up.1": 20.0},
    8: {"down.0": 60.0, "mid.attn": 55.0, "up.1": 50.0},
}


def _report(**overrides):
    recipes = apple_recipes(CUM, SIZES, [45.0, 35.0, 25.0])
    fields = dict(
        model_version="org/model",
        baselines={"original": math.inf, "linear_8bit": 48.25},
        recipes=[(recipes[0], 52.5), (recipes[1], None), (recipes[2], float("nan"))],
        single_layer={
            8: {"down.0": [61.0, 62.0], "mid.attn": [57.0, math.inf], "up.1": [51.0, 52.0]},
            1: {"down.0": [41.0, 40.0]},
        },
        cumulative={8: {"up.1": [50.0, 50.0], "down.0": [61.5, 61.5]}},
        order={8: ["down.0", "mid.attn", "up.1"], 1: ["down.0", "mid.attn", "up.1"]},
        sizes=SIZES,
        extra={"search_id": 7, "timing": np.float32(1.5), "cap": math.inf, "prompts": ("p",)},
    )
    fields.update(overrides)
    return SearchReport(**fields)


def test_layout_and_metadata():
    out = to_apple_json(_report())
    assert list(out) == ["model_version", "baselines", "recipes", "single_layer",
                         "cumulative", "mbp_search"]
    assert out["model_version"] == "org/model"
    b = out["baselines"]
    assert b["original"] == JSON_INF_PSNR and b["linear_8bit"] == 48.25
    keys = list(out["recipes"])
    assert b[keys[0]] == 52.5
    assert keys[1] not in b  # not measured yet: only in "recipes"
    assert b[keys[2]] is None  # NaN -> null
    assert out["single_layer"]["8"]["metadata"] == {
        "nbits": 8, "out_ngroups": 1, "in_ngroups": 1, "cumulative": False}
    assert out["single_layer"]["8"]["mid.attn"] == [57.0, JSON_INF_PSNR]
    assert list(out["single_layer"]) == ["1", "8"]
    c8 = out["cumulative"]["8"]
    assert c8["metadata"] == {"nbits": 8, "out_ngroups": 1, "in_ngroups": 1, "cumulative": True,
                              "candidates": ["down.0", "mid.attn", "up.1"],
                              "sizes": [100, 200, 300]}
    assert [k for k in c8 if k != "metadata"] == ["down.0", "up.1"]  # in order, measured only
    assert [k for k in out["cumulative"]["1"]] == ["metadata"]  # ordered but not measured yet
    mbp = out["mbp_search"]
    assert mbp["search_id"] == 7 and mbp["timing"] == 1.5 and mbp["cap"] is None
    assert mbp["prompts"] == ["p"]
    assert mbp["recipe_info"][keys[0]]["threshold"] == 45.0
    assert mbp["recipe_info"][keys[0]]["strategy"] == "apple"


def test_strict_json_round_trip():
    report = _report()
    text = json.dumps(to_apple_json(report), allow_nan=False)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    model, recipes = parse_recipe_file(text)
    assert model == "org/model"
    assert recipes == {r.key: r.bits for r, _ in report.recipes}


def test_round_trip_via_path_and_bytes(tmp_path):
    text = json.dumps(to_apple_json(_report()), allow_nan=False)
    p = tmp_path / "recipes.json"
    p.write_text(text)
    assert parse_recipe_file(p) == parse_recipe_file(text.encode()) == parse_recipe_file(
        json.loads(text))


def test_same_key_recipes_are_not_overwritten():
    sizes = {"x": 100_000, "y": 1}
    r1 = make_recipe({"x": 8, "y": 8}, sizes, threshold=44.0)
    r2 = make_recipe({"x": 8, "y": 4}, sizes, strategy="optimal")
    r3 = make_recipe({"x": 8, "y": 8}, sizes, threshold=43.0)  # identical bits to r1
    assert r1.key == r2.key == r3.key
    out = to_apple_json(SearchReport("m", {}, [(r1, 50.0), (r2, 49.0), (r3, 50.0)], sizes=sizes))
    assert out["recipes"] == {
        "recipe_8.00_bit_mixedpalette": {"x": 8, "y": 8},
        "recipe_8.00_bit_mixedpalette_optimal": {"x": 8, "y": 4},
    }
    assert out["baselines"]["recipe_8.00_bit_mixedpalette_optimal"] == 49.0


def test_partial_and_inconsistent_reports():
    out = to_apple_json(SearchReport("m", {"original": 80.0}))
    assert out["recipes"] == {} and out["cumulative"] == {} and out["baselines"] == {
        "original": 80.0}
    json.dumps(out, allow_nan=False)
    with pytest.raises(ValueError, match="outside its order"):
        to_apple_json(_report(cumulative={8: {"zz": [1.0]}}))
    with pytest.raises(ValueError, match="without a size"):
        to_apple_json(_report(sizes={"down.0": 100}))
    with pytest.raises(TypeError, match="mbp_search.obj"):
        to_apple_json(_report(extra={"obj": object()}))


APPLE_FILE = """{
  "single_layer": {"4": {"metadata": {"nbits": 4, "out_ngroups": 1, "in_ngroups": 1,
                                      "cumulative": false},
                         "down_blocks.0.attentions.0.proj_in": [70.1, 69.8]}},
  "cumulative": {},
  "model_version": "stabilityai/stable-diffusion-xl-base-1.0",
  "baselines": {"original": 82.2, "linear_8bit": 66.0,
                "recipe_4.50_bit_mixedpalette": 75.8, "recipe_2.00_bit_mixedpalette": 60.1},
  "recipes": {
    "recipe_4.50_bit_mixedpalette": {"down_blocks.0.attentions.0.proj_in": 4,
                                     "mid_block.resnets.0.conv1": 6},
    "recipe_2.00_bit_mixedpalette": {"down_blocks.0.attentions.0.proj_in": 1,
                                     "mid_block.resnets.0.conv1": 16}
  }
}"""


def test_hand_written_apple_file():
    model, recipes = parse_recipe_file(APPLE_FILE)
    assert model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert recipes == {
        "recipe_4.50_bit_mixedpalette": {"down_blocks.0.attentions.0.proj_in": 4,
                                         "mid_block.resnets.0.conv1": 6},
        "recipe_2.00_bit_mixedpalette": {"down_blocks.0.attentions.0.proj_in": 1,
                                         "mid_block.resnets.0.conv1": 16},
    }


def test_bare_map_and_tolerated_forms():
    assert parse_recipe_file('{"a.b": 4, "c": 16}') == (None, {UNNAMED_RECIPE: {"a.b": 4, "c": 16}})
    assert parse_recipe_file({"recipes": {"k": {"a": 4.0}}}) == (None, {"k": {"a": 4}})


@pytest.mark.parametrize(
    "data, match",
    [
        ("{not json", "not valid JSON"),
        ('{"a": NaN}', "not valid JSON: NaN is not allowed"),
        (b"\xff\xfe", "not UTF-8"),
        ("[1, 2]", "must be a JSON object, got list"),
        ('"text"', "must be a JSON object, got str"),
        ("{}", "empty object"),
        ('{"model_version": "m", "baselines": {"original": 1}}', "no 'recipes'"),
        ('{"something": {"a": 4}}', "no 'recipes'"),
        ('{"recipes": []}', "'recipes' must be an object"),
        ('{"recipes": {}}', "'recipes' is empty"),
        ('{"recipes": {"k": [4]}}', "recipe 'k' is not an object"),
        ('{"recipes": {"k": {}}}', "recipe 'k' is empty"),
        ({"recipes": {"k": {1: 4}}}, "layer name 1 is not a string"),
        ({5: 4}, "layer name 5 is not a string"),
        ({"recipes": {3: {"a": 4}}}, "recipe key 3 is not a string"),
        ('{"recipes": {"k": {"conv": 5}}}', "layer 'conv' has bits 5, expected one of"),
        ('{"recipes": {"k": {"conv": "4x"}}}', "layer 'conv' has bits '4x'"),
        ('{"recipes": {"k": {"conv": true}}}', "layer 'conv' has bits True"),
        ('{"conv": 5}', "layer 'conv' has bits 5"),
        ('{"conv": 4.5}', "layer 'conv' has bits 4.5"),
        ('{"model_version": 3, "recipes": {"k": {"a": 4}}}', "model_version must be a string"),
    ],
)
def test_recipe_file_errors(data, match):
    with pytest.raises(RecipeFileError, match=match) as e:
        parse_recipe_file(data)
    assert "\n" not in str(e.value)


def test_unreadable_path(tmp_path):
    with pytest.raises(RecipeFileError, match="cannot read recipe file"):
        parse_recipe_file(tmp_path / "missing.json")
