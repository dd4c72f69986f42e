"""Driver side of the Core ML stage: `search apply` and `search validate`.

Reads the search, its recipes and its exact palettes from storage (or parses a recipe file),
ships one job to the Core ML worker (a Ray task that needs the ``coreml`` resource, unless
``coreml_node="any"``), and stores one ``Validation`` row per recipe. The search's own data
(recipes, palettes, measurements) is only read. Errors are ``ApplyError`` with a one-line
message.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.errors import first_line
from common.formats import FLOAT16_BITS, LayerSizes, average_bits, is_palettized
from search.config import SearchConfig
from search.driver.cluster import ensure_ray
from search.driver.palettes import load_stored_palette
from search.recipes.apple_json import UNNAMED_RECIPE, RecipeFileError, parse_recipe_file
from search.recipes.apple_rule import recipe_key
from storage import Search, Storage, StorageError, StoredRecipe, Validation
from storage.palette_store import PaletteStore
from workers.coreml.common import CoreMLError
from workers.coreml.task import COREML_RESOURCE, NODE_CHOICES, CoreMLJob, JobResult, RecipeJob, RecipeOutcome
from workers.evaluation.items import EvaluatorSettings
from workers.models import ModelError, model_options
from workers.palettize import PaletteError

Executor = Callable[[CoreMLJob, str], JobResult]


class ApplyError(Exception):
    """Applying or validating cannot go on; the message is one line for the user."""


@dataclass(frozen=True)
class ApplyReport:
    search_id: str
    node: str
    base_mlpackage: str | None
    base_cached: bool
    outcomes: tuple[RecipeOutcome, ...]
    validations: tuple[Validation, ...]
    notes: tuple[str, ...] = ()

    @property
    def failed(self) -> list[str]:
        return [v.recipe_key for v in self.validations if not v.structural_ok or v.numeric_ok is False]


# -- where the Core ML worker runs ----------------------------------------------------------
def default_coreml_node(ray_address: str | None) -> str:
    """'any' when Ray runs embedded on a machine without Core ML; otherwise a coreml node."""
    embedded = not (ray_address or os.environ.get("RAY_ADDRESS"))
    return "any" if embedded and sys.platform != "darwin" else "coreml"


def ray_executor(ray_address: str | None = None) -> Executor:
    def execute(job: CoreMLJob, coreml_node: str) -> JobResult:
        from workers.coreml.task import run_remote

        ensure_ray(ray_address)
        require_node(coreml_node)
        return run_remote(job, coreml_node)
    return execute


def require_node(coreml_node: str) -> None:
    """Refuse at once (one line) when the job needs a ``coreml`` node and the cluster has none."""
    import ray

    if coreml_node == "coreml" and ray.cluster_resources().get(COREML_RESOURCE, 0) < 1:
        raise ApplyError(f"no node of the Ray cluster has the '{COREML_RESOURCE}' resource: start a Mac with "
                         f"`ray start --address <head> --resources '{{\"{COREML_RESOURCE}\": 1}}'`, or pass "
                         "--coreml-node any (no Core ML prediction)")


def node_choice(coreml_node: str | None, ray_address: str | None) -> str:
    node = coreml_node or default_coreml_node(ray_address)
    if node not in NODE_CHOICES:
        raise ApplyError(f"--coreml-node must be one of {', '.join(NODE_CHOICES)}, got '{node}'")
    return node


# -- reading what the search stored ---------------------------------------------------------
def load_search(storage: Storage, search_id: str) -> Search:
    try:
        return storage.get_search(search_id)
    except StorageError as exc:
        raise ApplyError(str(exc)) from None


def select_keys(recipes: dict, choice: str | None, where: str) -> list[str]:
    keys = list(recipes)
    if not keys:
        raise ApplyError(f"{where} has no recipes")
    if choice is None:
        if len(keys) == 1:
            return keys
        raise ApplyError(f"{where} has {len(keys)} recipes: pass --recipe KEY or --recipe all ({', '.join(keys)})")
    if choice == "all":
        return keys
    if choice not in recipes:
        raise ApplyError(f"no recipe '{choice}' in {where}; choose one of: {', '.join(keys)}, or all")
    return [choice]


def stored_palettes(storage: Storage, search: Search, wanted: set[tuple[str, int]]) -> dict:
    """The exact palettes the search measured, checked against their stored digests."""
    stored, store, out = storage.palettes(search.id), PaletteStore(storage.path), {}
    missing = sorted(f"{l}@{b}" for l, b in wanted if (l, b) not in stored)
    if missing:
        raise ApplyError(f"search {search.id} stores no palette for {len(missing)} recipe layers "
                         f"({', '.join(missing[:5])}); resume the search to fit them")
    for key in sorted(wanted):
        try:
            out[key] = load_stored_palette(store, stored[key])
        except PaletteError as exc:
            raise ApplyError(str(exc)) from None
    return out


def evaluator_settings(search: Search) -> EvaluatorSettings:
    """What the Core ML worker's evaluator needs of the search's config to measure as it did."""
    return config_settings(search.config)


def config_settings(config: dict) -> EvaluatorSettings:
    """`evaluator_settings` from a stored config (e.g. one a service sent to `search apply --here`)."""
    c = SearchConfig.from_dict(config)
    return EvaluatorSettings(c.signal_spec(), c.precision, c.min_size)


def _file_recipes(path: Path, search: Search, stored: list[StoredRecipe], sizes: dict[str, int],
                  choice: str | None) -> tuple[list[RecipeJob], list[str]]:
    try:
        model_version, recipes = parse_recipe_file(Path(path))
    except RecipeFileError as exc:
        raise ApplyError(str(exc)) from None
    notes = []
    if UNNAMED_RECIPE in recipes and set(recipes[UNNAMED_RECIPE]) <= set(sizes):
        bits = recipes.pop(UNNAMED_RECIPE)
        recipes[recipe_key(average_bits(bits, sizes))] = bits
    if model_version and model_version not in (search.model, search.model_version):
        notes.append(f"{path.name} was made for {model_version}; its layer names are looked up in the model "
                     "being compressed")
    measured = {tuple(sorted(r.bits.items())): r.psnr for r in stored}
    jobs = []
    for key in select_keys(recipes, choice, str(path)):
        bits = recipes[key]
        full = {l: bits.get(l, FLOAT16_BITS) for l in sizes} | bits  # absent candidates stay float16
        # Same bits as a recipe the search measured: the k-means LUTs are the search's, so is the PSNR.
        jobs.append(RecipeJob(key, bits, None, measured.get(tuple(sorted(full.items())))))
    return jobs, notes


# -- apply / validate -----------------------------------------------------------------------
def run_on_node(execute: Executor | None, job: CoreMLJob, node: str, ray_address: str | None) -> JobResult:
    execute = execute or ray_executor(ray_address)
    try:
        return execute(job, node)
    except (CoreMLError, ModelError, PaletteError) as exc:
        raise ApplyError(first_line(exc)) from None


def _store(storage: Storage, search: Search, result: JobResult, notes=()) -> ApplyReport:
    rows = []
    for o in result.outcomes:
        v = Validation(o.key, o.mlpackage, o.size_bytes, o.avg_bits, o.structural_ok, o.structural_detail,
                       o.numeric_psnr, o.numeric_ok, o.runtime, o.runtime_note, result.node)
        storage.put_validation(search.id, v)
        rows.append(v)
    return ApplyReport(search.id, result.node, result.base_mlpackage, result.base_cached, result.outcomes,
                       tuple(rows), tuple(notes))


def apply_recipes(storage: Storage, search_id: str, *, out_dir: str | os.PathLike, recipe: str | None = None,
                  mlpackage: str | os.PathLike | None = None, recipe_file: str | os.PathLike | None = None,
                  model: str | None = None, coreml_node: str | None = None, ray_address: str | None = None,
                  execute: Executor | None = None) -> ApplyReport:
    """Apply one recipe (or all) of a search, or of a recipe file, to a Core ML UNet; store validations."""
    node = node_choice(coreml_node, ray_address)
    search = load_search(storage, search_id)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ApplyError(f"output {out} is a file; give a directory")
    stored = storage.recipes(search.id)
    other_model = model is not None and model != search.model
    notes: list[str] = []
    if recipe_file is not None:
        layers = storage.layers(search.id)
        sizes = LayerSizes({l.name: l.numel for l in layers}, {l.name: l.shape[0] for l in layers})
        recipes, notes = _file_recipes(Path(recipe_file), search, stored, sizes, recipe)
        lut_source = "kmeans"
    else:
        if not stored:
            raise ApplyError(f"search {search.id} has no recipes yet (status {search.status}); finish it with "
                             f"`search resume {search.id}`, or pass --recipe-file")
        by_key = {r.key: r for r in stored}
        recipes = [RecipeJob(k, by_key[k].bits, by_key[k].avg_bits, by_key[k].psnr)
                   for k in select_keys(by_key, recipe, f"search {search.id}")]
        lut_source = "kmeans" if other_model else "search"
    if other_model:  # another UNet (e.g. fine-tuned): LUTs fitted to its weights, nothing measured for it
        recipes = [RecipeJob(r.key, r.bits, None, None) for r in recipes]
        notes.append(f"applying to {model}, not the search's model {search.model}: LUTs are fitted to its "
                     "weights and there is no measured PSNR to compare with")
    palettes = {} if lut_source == "kmeans" else stored_palettes(
        storage, search, {(l, b) for r in recipes for l, b in r.bits.items() if is_palettized(b)})
    job = CoreMLJob("apply", search.id, model or search.model, None if other_model else search.fingerprint,
                    evaluator_settings(search), tuple(recipes), palettes, lut_source, str(out),
                    str(Path(mlpackage).expanduser().resolve()) if mlpackage else None,
                    model_options={} if other_model else model_options(search.config))
    result = run_on_node(execute, job, node, ray_address)
    return _store(storage, search, result, notes)


def validate_recipes(storage: Storage, search_id: str, *, recipe: str | None = None,
                     package_dir: str | os.PathLike | None = None, model: str | None = None,
                     coreml_node: str | None = None, ray_address: str | None = None,
                     execute: Executor | None = None) -> ApplyReport:
    """Validate again the packages `apply` wrote (e.g. on a Mac, for Core ML prediction)."""
    node = node_choice(coreml_node, ray_address)
    search = load_search(storage, search_id)
    rows = storage.validations(search.id)
    if not rows:
        raise ApplyError(f"search {search.id} has no applied recipes; run `search apply {search.id}` first")
    keys = select_keys(rows, recipe or "all", f"the applied recipes of search {search.id}")
    by_key = {r.key: r for r in storage.recipes(search.id)}
    other_model = model is not None and model != search.model
    jobs = []
    for key in keys:
        path = Path(rows[key].mlpackage)
        if package_dir is not None:
            path = Path(package_dir).expanduser().resolve() / path.name
        r = by_key.get(key)
        jobs.append(RecipeJob(key, r.bits if r else None, None, None if (other_model or not r) else r.psnr,
                              str(path)))
    wanted = {(l, b) for k in keys if k in by_key for l, b in by_key[k].bits.items() if is_palettized(b)}
    palettes = {} if other_model else stored_palettes(storage, search, wanted)
    job = CoreMLJob("validate", search.id, model or search.model, None if other_model else search.fingerprint,
                    evaluator_settings(search), tuple(jobs), palettes,
                    model_options={} if other_model else model_options(search.config))
    result = run_on_node(execute, job, node, ray_address)
    return _store(storage, search, result)
