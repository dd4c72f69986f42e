"""Re-derive a download's recipes from the JSON alone, with the serial reference's plain
version of Apple's rule (no project code): thresholds from the baselines, Apple's rule on the
cumulative values, average bits over the candidates, keys. Every end-to-end test calls it.

A search without cumulative curves (fast mode) has no layer sizes in its JSON: the caller passes
the model's directory and the sizes come from the plain reference (`apple_serial.candidate_layers`
on the pipeline loaded by diffusers), so every recipe's key and average bits are still checked."""
from __future__ import annotations

from tests.reference.apple_serial import build_recipe, candidate_layers, load_pipeline, recipe_key, recipe_thresholds


def _layers(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "metadata"}


def reference_sizes(model_dir, min_size: float) -> dict[str, int]:
    """Candidate layer -> weight numel, from the pipeline itself (no project code)."""
    return dict(candidate_layers(load_pipeline(str(model_dir)).unet, min_size))


def check_apple_recipes_from_json(doc: dict, model_dir=None) -> int:
    """Assert every recipe of ``doc`` is what its numbers imply; return how many Apple-rule
    recipes were re-derived. Every recipe gets its key and average bits checked (``model_dir``
    is needed for that when the JSON holds no cumulative curves)."""
    mbp = doc["mbp_search"]
    config = mbp["config"]
    protocol = config.get("protocol", "classic")
    nbits = sorted(int(n) for n in doc["cumulative"]) or sorted(config["nbits"])
    info = mbp["recipe_info"]
    first = doc["cumulative"][str(nbits[0])]["metadata"] if doc["cumulative"] else None
    sizes = dict(zip(first["candidates"], first["sizes"])) if first else None
    if model_dir is not None:
        ref = reference_sizes(model_dir, config["min_size"])
        assert sizes is None or sizes == ref, "the JSON's candidate sizes are not the model's"
        sizes = ref
    assert sizes is not None or not doc["recipes"], "no cumulative curves: pass model_dir to check the recipes"
    n_prompts = len(config["prompts"])
    default = config.get("default_nbits", 16)

    # Every recipe: its key is its average bits over the candidates (16s counted as 16).
    for key, bits in doc["recipes"].items():
        assert set(bits) == set(sizes), f"{key}: not one entry per candidate"
        avg = sum(b * sizes[layer] for layer, b in bits.items()) / sum(sizes.values())
        assert key.startswith(recipe_key(avg)), (key, avg)
        assert abs(info[key]["avg_bits"] - avg) < 1e-9, key

    apple = {k: r for k, r in doc["recipes"].items() if info[k]["strategy"] == "apple"}
    if not apple:
        return 0
    linear8 = "linear_8bit" if protocol == "apple" else "linear_8bit_per_channel"
    if protocol == "apple":
        ts = recipe_thresholds(doc["baselines"]["original"], doc["baselines"][linear8], config["num_recipes"])
    else:  # the classic protocol caps / widens Apple's range: check each recipe at its recorded threshold
        ts = [info[k]["threshold"] for k in apple]
    derived: dict[str, dict] = {}
    for t in ts:
        recipe, avg, _ = build_recipe(doc["cumulative"], sizes, t, nbits, default, n_prompts)
        derived[recipe_key(avg)] = recipe  # a later threshold overwrites, as in Apple's dict
    assert apple == derived, f"Apple-rule recipes differ: {sorted(apple)} vs {sorted(derived)}"
    if protocol == "apple":  # measured end to end, rounded once more to 0.1 dB
        for key in apple:
            if info[key]["psnr"] is not None:
                assert doc["baselines"][key] == float(f"{info[key]['psnr']:.1f}"), key
    return len(derived)
