"""Defaults shared by the option table (``submit_options``, light) and ``SearchConfig``.

REFINE_EVALS: end-to-end measurements per optimal size target spent by the measured refinement
(``search.recipes.refine``; the starting points included). Chosen from benchmarks/recipe_quality.py
on the bench model (CPU float32, Apple's protocol, 75 candidates, depths 1,2,4,6,8): gain of the
refined recipe over Apple's at 3 / 4 / 5 bits +1.09 / +0.46 / +1.50 dB after 16, +1.99 / +0.85 /
+1.55 dB after 32 (one seeded path: the first 16 of a 32 run are the 16 run). 32 keeps refined fast mode within a
third of Apple's runs there (3 targets: ~242 of 758), and far within it on SDXL-sized models,
whose Apple analysis (2 x depths x 792 runs) grows with the layers while refinement does not.
"""
REFINE_EVALS = 32
