"""`search download ID --mlpackage KEY|all -o DIR`: the Core ML packages the cluster shipped to the
service (or, locally, next to the database), fetched in pieces, checked against their stored
sha256 and unpacked. A download goes to a hidden ``.partial`` zip that a new attempt resumes;
only a zip whose digest matches is unpacked, and the package directory appears whole or not at all.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from common.files import publish_dir
from search.cli.console import CliError

BLOCK = 8 * 2**20


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK):
            sha.update(block)
    return sha.hexdigest()


def _choose(info: dict, choice: str, where: str) -> dict[str, dict]:
    cm = info.get("coreml") or {}
    packages = cm.get("packages") or {}
    shipped = {k: p for k, p in packages.items() if p["status"] == "shipped"}
    if choice == "all":
        if not shipped:
            raise CliError(f"search {info['id']} has no Core ML packages yet (Core ML phase: "
                           f"{cm.get('status', 'never asked')}); apply its recipes with `search apply {info['id']}{where}`")
        return shipped
    if choice not in shipped:
        why = f": {packages[choice]['detail']}" if choice in packages and packages[choice]["detail"] else ""
        have = ", ".join(shipped) or "none"
        raise CliError(f"search {info['id']} has no package for recipe '{choice}'{why} (packages: {have})")
    return {choice: shipped[choice]}


def _unpack(zip_path: Path, out_dir: Path) -> Path:
    """Unpack the zip's one ``<name>.mlpackage`` folder and its ``<name>.mbp.json`` manifest into
    ``out_dir`` (built aside, then moved into place)."""
    with zipfile.ZipFile(zip_path) as zf:
        names = [PurePosixPath(n) for n in zf.namelist()]
        tops = {n.parts[0] for n in names if n.parts}
        folders = [t for t in tops if t.endswith(".mlpackage") and not t.startswith(".")]
        if len(folders) != 1 or any(n.is_absolute() or ".." in n.parts for n in names):
            raise CliError(f"{zip_path.name}: not one .mlpackage folder")
        top = folders[0]
        manifest = top.removesuffix(".mlpackage") + ".mbp.json"
        if tops - {top, manifest}:
            raise CliError(f"{zip_path.name}: unexpected entries {', '.join(sorted(tops - {top, manifest}))}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{top}-", dir=out_dir))
        zf.extractall(tmp)
    publish_dir(tmp / top, out_dir / top)
    if (tmp / manifest).is_file():
        os.replace(tmp / manifest, out_dir / manifest)
    tmp.rmdir()
    return out_dir / top


def download_packages(backend, search_id: str, choice: str, out_dir: Path) -> list[tuple[str, Path, dict]]:
    """Fetch, check and unpack the chosen packages; returns (key, package directory, stored facts)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"{out_dir} is a file; give a directory for the .mlpackage folders")
    if not out_dir.parent.exists():
        raise CliError(f"directory {out_dir.parent} does not exist")
    info = backend.coreml(search_id)
    chosen = _choose(info, choice, backend.where)
    out_dir.mkdir(exist_ok=True)
    done = []
    for key, facts in chosen.items():
        partial = out_dir / f".{info['id']}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.mlpackage.zip.partial"
        with open(partial, "ab") as fh:
            if fh.tell() > facts["size_bytes"]:
                fh.truncate(0)
            backend.fetch_package(info["id"], key, fh)
        digest = _sha256(partial)
        if digest != facts["sha256"]:
            partial.unlink(missing_ok=True)
            raise CliError(f"the package of recipe {key} arrived damaged (sha256 {digest[:12]}..., expected "
                           f"{facts['sha256'][:12]}...); download it again")
        done.append((key, _unpack(partial, out_dir), facts))
        partial.unlink()
    return done
