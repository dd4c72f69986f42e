"""Session fixtures shared by all tests: one model cache and the two built-in tiny models.

The tiny pipelines are built once per session (a few seconds) into a temporary cache, so
tests never touch the user's cache or the network.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_configure(config):
    # diffusers' Euler scheduler calls np.array() on a torch tensor; numpy 2 warns on every call.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
    one_thread_per_process()


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def one_thread_per_process() -> None:
    """One OpenMP/BLAS thread in every test process and the commands they start (unless set
    already). The suite runs two test processes plus Ray's evaluators (one thread each already)
    on 2 cores; with torch's default of a thread per core, tiny models' many small parallel
    regions had threads spinning while they waited for a descheduled partner: one
    test_prefix_reuse test, both runs side by side on a loaded 2-core machine, took 157 s (19 s of
    CPU) with 1 thread and had not finished after 690 s (80 s of CPU) with 2. Results do not
    depend on it: search evaluators and the serial reference set their own thread counts."""
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, "1")  # inherited by pytest-xdist's workers and by subprocesses
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch read the variable at import


# Rough seconds of the longest files in a whole `make test` (`--durations`, 2 cores, shared machine):
# the order scripts/test.sh's two pytest-xdist workers take whole files in. A file missing here
# comes after these, the ones with a slow test first; a wrong number costs balance, never a test.
# test_resume (26 candidates instead of 47), test_prefix_reuse (Flux at 64 px, not 1024) and the
# files added since (coreai_bundle, single_file_search, gallery): measured alone on the shared
# 2-core machine, scaled by 1.2 (test_resume's `make test` time over its time alone); test_prefix_reuse
# (44 s alone, all CPU, so slowed most by the file beside it) by a guessed 2.5. test_bundle, test_coreml,
# test_chunk, test_apple_denoiser: measured alone the same way (load 3-4), scaled by 1.2.
# The reference files, test_multinode, test_reuse and the Core AI service files: a whole run on
# 2026-12-07's tree at load 4-16 (54 min), its --durations summed per file, rounded.
EXPECTED_S = {
    "tests/search/test_resume.py": 790, "tests/workers/test_prefix_reuse.py": 120,
    "tests/search/test_coreai_bundle.py": 180, "tests/search/test_single_file_search.py": 140,
    "tests/search/test_gallery.py": 200, "tests/search/test_reuse.py": 500,
    "tests/search/test_coreai_service.py": 180, "tests/search/test_coreai_apply.py": 80,
    "tests/search/test_bundle.py": 330, "tests/reference/test_families_match_reference.py": 700,
    "tests/search/test_multinode.py": 500, "tests/reference/test_search_matches_reference.py": 420,
    "tests/search/test_resume_signals.py": 300, "tests/search/test_service.py": 300,
    "tests/search/test_fast_float16.py": 240, "tests/reference/test_reference_selfcheck.py": 200,
    "tests/search/test_dashboard.py": 190, "tests/workers/test_coreml.py": 190,
    "tests/search/test_bundle_service.py": 170, "tests/search/test_disk_errors.py": 150,
    "tests/search/test_strategies.py": 150, "tests/workers/test_apple_denoiser.py": 70,
    "tests/workers/test_chunk.py": 140, "tests/search/test_end_to_end.py": 100,
    "tests/search/test_crash_campaign.py": 100, "tests/search/test_palette_tasks.py": 100,
    "tests/search/test_formats_end_to_end.py": 100, "tests/search/test_apply.py": 100,
    "tests/workers/test_bundle_components.py": 100, "tests/search/test_coreml_phase.py": 80,
}


def file_order(items) -> dict[str, tuple]:
    """{file: sort key}: known long files longest first, then files with any slow test, then the
    rest; one key per file, so a file's tests stay together (its module fixtures are built once)."""
    files: dict[str, bool] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        files[path] = files.get(path, False) or item.get_closest_marker("slow") is not None
    return {path: (-EXPECTED_S.get(path, 0), not slow) for path, slow in files.items()}


def pytest_collection_modifyitems(config, items):
    """Longest files first (a stable sort: the order within each file stays). pytest-xdist hands
    out whole files in this order (scripts/test.sh turns off its own reordering by test count, which
    put one-test files like the crash campaign last), so the short ones fill the gaps at the end
    instead of a long search file starting last and running alone."""
    order = file_order(items)
    items.sort(key=lambda item: order[item.nodeid.split("::")[0]])


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A session-wide model cache; MBP_SEARCH_CACHE points at it (also for subprocesses)."""
    path = tmp_path_factory.mktemp("mbp-cache")
    old = os.environ.get("MBP_SEARCH_CACHE")
    os.environ["MBP_SEARCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MBP_SEARCH_CACHE", None)
    else:
        os.environ["MBP_SEARCH_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_sdxl_spec(model_cache):
    from workers.models import resolve_model

    return resolve_model("tiny-sdxl", model_cache)


@pytest.fixture(scope="session")
def tiny_sd_spec(model_cache):
    from workers.models import resolve_model

    return resolve_model("tiny-sd", model_cache)


def _available(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        return mps is not None and mps.is_available()
    return True


@pytest.fixture(params=["cpu", "cuda", "mps"])
def device(request) -> str:
    """Each torch device present on this machine (others are skipped)."""
    if not _available(request.param):
        pytest.skip(f"{request.param} not available")
    return request.param


# -- a completed search to apply (Core ML stage tests) -----------------------------------

def build_completed_search(spec, model: str, db, cycles=((4, 16, 2, 16, 6, 16, 4, 16),), prompts: int = 2,
                           with_8bit: bool = True) -> dict:
    """A search of ``model`` in its final state, built directly (no Ray): candidate layers, real
    k-means palettes saved in the PaletteStore, one recipe per cycle of bits over the candidates
    (plus one with three 8-bit layers when ``with_8bit``) whose end-to-end PSNR was measured by the
    real Evaluator. Returns {"db", "search_id", "recipes": {key: (bits, psnr)}}."""
    from common.formats import formats_json
    from search.config import SearchConfig
    from search.recipes.apple_rule import make_recipe
    from storage import Layer, PaletteInfo, Storage, StoredRecipe
    from storage.palette_store import PaletteStore
    from workers.evaluation.evaluator import Evaluator
    from workers.evaluation.items import WorkItem
    from workers.models import candidate_layers, load_denoiser, denoiser_fingerprint
    from workers.palettize import kmeans_palette, save_palette
    from workers.evaluation.signal import DEFAULT_PROMPTS

    unet = load_denoiser(spec)
    cands = candidate_layers(unet, spec.default_min_size)
    from tests.reference.local_images import write_images
    from workers.evaluation.images import folder_images

    images = folder_images(str(write_images(Path(db).parent / "images", prompts))) if spec.img2img else ()
    config = SearchConfig(nbits=(2, 4, 6, 8), num_recipes=2, min_size=spec.default_min_size,
                          resolution=spec.default_resolution, prompts=DEFAULT_PROMPTS[:prompts], images=images,
                          steps=spec.default_steps if spec.img2img else 1)
    storage = Storage(db)
    fingerprint = denoiser_fingerprint(unet)
    search = storage.create_search(
        model=model, model_version=model, model_location=spec.location, model_source=spec.source,
        fingerprint=fingerprint, config=config.to_dict(), config_hash=config.fingerprint(),
        layers=[Layer(c.name, c.numel, c.shape, c.kind) for c in cands])
    sizes = {c.name: c.numel for c in cands}
    # Mixed recipes over 1-8 bits (few 6/8-bit layers: their exact k-means is the slow part).
    recipes = [make_recipe({c.name: cycle[i % len(cycle)] for i, c in enumerate(cands)}, sizes) for cycle in cycles]
    if with_8bit:
        recipes.append(make_recipe({c.name: 8 if i < 3 else 4 if i % 2 else 16 for i, c in enumerate(cands)}, sizes))
    store, palettes = PaletteStore(db), {}
    for r in recipes:
        for layer, bits in r.bits.items():
            if bits == 16 or (layer, bits) in palettes:
                continue
            pal = kmeans_palette(unet.get_submodule(layer).weight.data.numpy(), bits)
            save_palette(store.path_for(search.id, layer, bits), pal)
            storage.add_palette(search.id, PaletteInfo(layer, bits, pal.digest, float(pal.weight_mse),
                                                       store.relative_path(search.id, layer, bits)))
            palettes[(layer, bits)] = pal
    ev = Evaluator(spec, config.signal_spec(), precision=config.precision, fingerprint=fingerprint, device="cpu",
                   min_size=config.min_size)
    out = {}
    for r in recipes:
        storage.add_recipe(search.id, StoredRecipe(r.key, r.strategy, r.threshold, None, r.bits, r.avg_bits,
                                                   r.size_mb, None, None, None, None, None))
        item = WorkItem(f"recipe/{r.key}", "recipe", name=r.key,
                        assignment=tuple(sorted((l, b) for l, b in r.bits.items() if b != 16)))
        res = ev.evaluate(item, palettes)
        storage.set_recipe_result(search.id, r.key, psnr=res.psnr, per_prompt=res.per_prompt, node=res.node,
                                  duration_s=res.duration_s)
        out[r.key] = (formats_json(r.bits), res.psnr)  # the recipe as a file holds it
    storage.update_search(search.id, status="completed", phase="done", finished=True)
    storage.close()
    return {"db": db, "search_id": search.id, "recipes": out}


@pytest.fixture(scope="session")
def completed_tiny_search(tiny_sdxl_spec, tmp_path_factory):
    """A `tiny-sdxl` search in its final state (`build_completed_search`): two recipes.
    Tests must not change the recipes, palettes or measurements (they may add validations)."""
    db = tmp_path_factory.mktemp("completed-search") / "searches.db"
    return build_completed_search(tiny_sdxl_spec, "tiny-sdxl", db)


@pytest.fixture(scope="session")
def coreml_out_dir(tmp_path_factory):
    """One output directory for the Core ML tests: the converted base UNet is cached in it."""
    return tmp_path_factory.mktemp("coreml-out")
