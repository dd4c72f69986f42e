"""Defaults shared by the option table (``submit_options``, light) and ``SearchConfig``.

REFINE_EVALS: end-to-end measurements per optimal target spent by the measured refinement
(``search.recipes.refine``): 2 starting points + 7 generations of 2. A first choice sized so
that refined fast mode stays within a third of Apple's runs (fast ~ L + 16 x targets vs Apple's
2 x depths x L); not yet tuned on the bench model's convergence (benchmarks/recipe_quality.py
--refine-evals N reports it).
"""
REFINE_EVALS = 16
