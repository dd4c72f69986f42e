"""The recipes phase of a search (`SearchDriver` inherits it): Apple's and the optimal recipes
planned from the stored tables, stored under free keys, measured end to end, each optimal size
target refined with measurements (`search.driver.refinement`)."""
from __future__ import annotations

from search.driver.refinement import refine_targets
from search.recipes.apple_rule import unique_key
from search.recipes.strategy import plan_apple_recipes, plan_target
from search.recipes.tables import load_tables, weight_mse
from storage import StoredRecipe
from common.formats import is_palettized
from workers.evaluation.items import WorkItem


class RecipePhases:
    """Needs the driver's ``storage``, ``search``, ``config``, ``reporter``, ``evaluations``,
    ``_run_items`` and ``_submit_eval``."""

    def _phase_recipes(self) -> None:
        """Apple's recipes first, measured together; then each optimal size target in turn, planned
        just before it is stored, so its prediction is calibrated on every recipe measured so far
        (``strategy.calibration``; the bit map does not depend on it), measured, refined."""
        sid = self.search.id
        planned, notes = plan_apple_recipes(self.config, load_tables(self.storage, sid), weight_mse(self.storage, sid))
        for note in notes:
            self.reporter.message(f"[dim]{note}")
        for p in planned:
            self.store_recipe(p)
        self.measure_recipes([r.key for r in self.storage.recipes(sid) if r.psnr is None])
        for bits in self.config.optimal_targets() if "optimal" in self.config.strategy else ():
            p, note = plan_target(self.config, load_tables(self.storage, sid), weight_mse(self.storage, sid), bits)
            if p is None:
                self.reporter.message(f"[dim]{note}")
                continue
            self.measure_recipes([self.store_recipe(p)])
            if self.config.refine_evals > 0:
                refine_targets(self, [p])  # measured refinement of the size target

    def store_recipe(self, p) -> str:
        """Store a planned recipe under a free key; the same bit map is stored once."""
        taken = {r.key: r.bits for r in self.storage.recipes(self.search.id)}
        key = unique_key(p.recipe, taken)
        if key is None:
            return next(k for k, bits in taken.items() if bits == p.recipe.bits)
        r = p.recipe
        self.storage.add_recipe(self.search.id, StoredRecipe(key, r.strategy, r.threshold, p.target, r.bits,
                                                             r.avg_bits, r.size_mb, p.predicted, None, None, None,
                                                             None))
        return key

    def measure_recipes(self, keys: list[str]) -> None:
        sid = self.search.id
        by_key = {r.key: r for r in self.storage.recipes(sid)}
        items = [WorkItem(f"recipe/{k}", "recipe", name=k,
                          assignment=tuple(sorted((l, b) for l, b in by_key[k].bits.items() if is_palettized(b))))
                 for k in keys if by_key[k].psnr is None]

        def store(item: WorkItem, r) -> None:
            self.evaluations += 1
            self.storage.set_recipe_result(sid, item.name, psnr=r.psnr, per_prompt=r.per_prompt, node=r.node,
                                           duration_s=r.duration_s)

        self._run_items("recipes", items, self._submit_eval, store)
