"""Core AI (iOS 27 / macOS 27) target of `search bundle`: the folder Apple's ``coreai-models``
diffusion exporter writes and its Swift ``CoreAIDiffusionPipeline`` loads, with the recipe's
denoiser palettized with exactly the search's LUTs and indices, validated on the Linux Core AI
runtime, and compared with Apple's own ``4bit`` preset.

The Core AI packages are an optional extra (``pip install -e .[coreai]``); nothing here imports
them at module level, so the rest of the project works without them and ``require`` says in one
line how to install.
"""
from __future__ import annotations

INSTALL_HINT = ("the Core AI packages are not installed: pip install coreai-torch==0.4.3 coreai-opt==0.4.0 "
                "coreai-core==1.0.0b3 --no-deps (the project's coreai extra: scripts/setup.sh installs it)")


class CoreAIError(Exception):
    """One-line failure of the Core AI target (refused input, failed export or check)."""


def available() -> bool:
    """Whether coreai-core, coreai-torch and coreai-opt import."""
    try:
        import coreai.runtime  # noqa: F401
        import coreai_opt  # noqa: F401
        import coreai_torch  # noqa: F401
    except Exception:  # ImportError, or a broken native library: either way not usable
        return False
    return True


def require() -> None:
    if not available():
        raise CoreAIError(INSTALL_HINT)
