"""Defaults shared by the option table (``submit_options``, light) and ``SearchConfig``.

REFINE_EVALS: end-to-end measurements per optimal target spent by the measured refinement
(``search.recipes.refine``). Chosen from the bench model (benchmarks/recipe_quality.py): the best
measured recipe stops improving after ~12-16 measurements at 3-6 bits on CPU float32 and
float16, and 16 per target keeps fast mode within a third of Apple's runs.
"""
REFINE_EVALS = 16
