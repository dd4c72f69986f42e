"""The Core ML phase's worker, for searches submitted with ``--target coreai`` (issue 36).

`CoreAIWorker` is the Core ML worker (`workers.coreml.shipping.CoreMLWorker`: one Ray actor per
job, the model loaded once from the weights the driver shipped, zips pulled to the head in pieces
by ``pieces``) with one more call, ``coreai``: build one recipe's Core AI folder with exactly the
search's LUTs (`workers.coreai.bundle.build`: the checks on the Linux Core AI runtime and the
comparison with Apple's 4bit preset) and zip it under one top folder ``CoreAI/``. Core AI runs on
Linux, so the phase runs it on any node.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from workers.coreml.shipping import CoreMLWorker, zip_files

COREAI_TOP = "CoreAI"  # the one folder of a Core AI zip
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")  # a recipe key as one file name (as the package store names zips)


@dataclass(frozen=True)
class PackedCoreAI:
    """One recipe's Core AI folder built on a node and zipped, ready to ship."""
    result: object  # workers.coreai.bundle.CoreAIResult
    size_bytes: int
    sha256: str
    node: str


def zip_coreai(folder: Path, dest: Path) -> tuple[int, str]:
    """Zip a Core AI folder into ``dest`` under ``CoreAI/``: every regular file, sorted by path
    (`zip_files`: the same folder gives the same zip); hidden top-level leftovers stay out."""
    files = [(p, f"{COREAI_TOP}/{p.relative_to(folder).as_posix()}") for p in sorted(folder.rglob("*"))
             if p.is_file() and not p.relative_to(folder).parts[0].startswith(".")]
    return zip_files(files, dest)


class CoreAIWorker(CoreMLWorker):
    def coreai(self, key: str, compare_4bit: bool = True) -> PackedCoreAI:
        """Build, check and zip one recipe's Core AI folder; the folder is removed once zipped."""
        from workers.coreai.bundle import CoreAIJob, build

        node = self.node()
        recipe = next(r for r in self.job.recipes if r.key == key)
        root = Path(self.job.out_dir) / "coreai"
        folder = root / _SAFE.sub("_", key)
        shutil.rmtree(folder, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        job = CoreAIJob(self.job.search_id, self.job.model, self.fingerprint, key, dict(recipe.bits), recipe.avg_bits,
                        recipe.measured_psnr, self.job.palettes, str(folder), self.model_version, compare_4bit)
        result = build(job, self.ev)
        dest = root / f"{folder.name}.coreai.zip"
        size, sha256 = zip_coreai(folder, dest)
        shutil.rmtree(folder)
        self.zips[("coreai", key)] = dest
        return PackedCoreAI(result, size, sha256, node)
