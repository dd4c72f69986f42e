"""Small mechanisms every layer shares (files, errors, time, bit depths). Imports nothing of
the project, so search/, workers/ and storage/ may all use it."""
