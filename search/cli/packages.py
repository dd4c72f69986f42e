"""`search download ID --mlpackage KEY|all -o DIR` and `--bundle KEY|all -o DIR`: the Core ML
packages and the Resources folders (bundles) the cluster shipped to the service (or, locally, next
to the database), fetched in pieces, checked against their stored sha256 and unpacked. A download
goes to a hidden ``.partial`` zip that a new attempt resumes; only a zip whose digest matches is
unpacked, and the package directory (``DIR/<name>.mlpackage``) or the bundle's folder
(``DIR/<key>/``, the one Swift's ``resourcesAt:`` takes) appears whole or not at all.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from common.files import publish_dir, sha256_of
from search.cli.console import CliError
from storage.package_store import safe_name


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


def _fetch(backend, search_id: str, key: str, kind: str, size: int, sha256: str, out_dir: Path) -> Path:
    """Download (or resume) one zip into a hidden partial file in ``out_dir``; returns it once its
    digest is the stored one (a damaged one is deleted: one line)."""
    digest_key = hashlib.sha256(key.encode()).hexdigest()[:16]
    partial = out_dir / f".{search_id}-{digest_key}.{kind}.zip.partial"
    with open(partial, "ab") as fh:
        if fh.tell() > size:  # not this zip: start again
            fh.truncate(0)
            fh.seek(0)
        backend.fetch_package(search_id, key, fh, kind)
    digest = sha256_of(partial)
    if digest != sha256:
        partial.unlink(missing_ok=True)
        what = "package" if kind == "mlpackage" else "bundle"
        raise CliError(f"the {what} of recipe {key} arrived damaged (sha256 {digest[:12]}..., expected "
                       f"{sha256[:12]}...); download it again")
    return partial


def _out_dir(out_dir: Path, what: str) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CliError(f"{out_dir} is a file; give a directory for the {what}")
    if not out_dir.parent.exists():
        raise CliError(f"directory {out_dir.parent} does not exist")


def download_packages(backend, search_id: str, choice: str, out_dir: Path) -> list[tuple[str, Path, dict]]:
    """Fetch, check and unpack the chosen packages; returns (key, package directory, stored facts)."""
    _out_dir(out_dir, ".mlpackage folders")
    info = backend.coreml(search_id)
    chosen = _choose(info, choice, backend.where)
    out_dir.mkdir(exist_ok=True)
    done = []
    for key, facts in chosen.items():
        partial = _fetch(backend, info["id"], key, "mlpackage", facts["size_bytes"], facts["sha256"], out_dir)
        done.append((key, _unpack(partial, out_dir), facts))
        partial.unlink()
    return done


# -- bundles: a recipe's Resources folder for Apple's Swift pipeline ----------------------------
BUNDLE_TOP = "Resources"  # the zip's one folder (workers.coreml.shipping.zip_bundle)


def _choose_shipped(info: dict, rows: dict, choice: str, one: str, many: str, none_shipped: str) -> dict[str, dict]:
    """The shipped rows ``choice`` names ('all' or a recipe key), or one line saying why not: a
    recipe's own status and detail when it has a row, ``none_shipped`` when 'all' finds nothing."""
    shipped = {k: r for k, r in (rows or {}).items() if r["status"] == "shipped"}
    if choice == "all":
        if not shipped:
            raise CliError(none_shipped)
        return shipped
    if choice not in shipped:
        r = (rows or {}).get(choice)
        why = f" ({r['status']}: {r['detail']})" if r is not None else ""
        raise CliError(f"search {info['id']} has no shipped {one} for recipe '{choice}'{why} "
                       f"({many}: {', '.join(shipped) or 'none'})")
    return {choice: shipped[choice]}


def _choose_bundles(info: dict, choice: str, where: str) -> dict[str, dict]:
    cm = info.get("coreml") or {}
    how = (f"the Core ML phase builds them: `search apply {info['id']}{where}`" if where else
           f"build one here with `search bundle {info['id']} --recipe KEY -o DIR`")
    return _choose_shipped(info, info.get("bundles"), choice, "bundle", "bundles",
                           f"search {info['id']} has no shipped bundles (Core ML phase: "
                           f"{cm.get('status', 'never asked')}); {how}")


def _unpack_folder(zip_path: Path, out_dir: Path, key: str, top: str, report_name: str, check) -> Path:
    """Unpack the zip's one ``top/`` folder as ``out_dir/<key>`` (built aside, then moved into
    place), after ``check(folder)`` (a CliError) has accepted the folder's own report: a zip with
    anything outside ``top/`` or without ``top/report_name`` is refused before it is extracted."""
    with zipfile.ZipFile(zip_path) as zf:
        names = [PurePosixPath(n) for n in zf.namelist()]
        if (any(n.is_absolute() or ".." in n.parts or n.parts[0] != top for n in names)
                or PurePosixPath(top, report_name) not in names):
            raise CliError(f"{zip_path.name}: not one {top}/ folder with a {report_name}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{safe_name(key)}-", dir=out_dir))
        try:
            zf.extractall(tmp)
            check(tmp / top)
            final = out_dir / safe_name(key)
            publish_dir(tmp / top, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _unpack_bundle(zip_path: Path, out_dir: Path, key: str) -> Path:
    """A Core ML bundle: its bundle.json must name this recipe."""
    from workers.coreml.bundle.manifest import MANIFEST, read

    def check(folder: Path) -> None:
        try:
            manifest = read(folder)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if manifest.get("recipe_key") != key:
            raise CliError(f"the bundle of recipe {key} holds recipe {manifest.get('recipe_key')!r}")

    return _unpack_folder(zip_path, out_dir, key, BUNDLE_TOP, MANIFEST, check)


def download_bundles(backend, search_id: str, choice: str, out_dir: Path) -> list[tuple[str, Path, dict]]:
    """Fetch, check and unpack the chosen bundles; returns (key, Resources folder, stored facts).
    Core AI folders instead (`download_coreai`) when the search's Core ML phase builds them (submitted
    with ``--target coreai``, or applied with it last), or when it has Core AI folders and no bundles."""
    _out_dir(out_dir, "bundle folders")
    detail = backend.detail(search_id)
    info = backend.coreml(search_id)
    if _wants_coreai(detail, info):
        return download_coreai(backend, detail, choice, out_dir)
    chosen = _choose_bundles(info, choice, backend.where)
    out_dir.mkdir(exist_ok=True)
    done = []
    for key, facts in chosen.items():
        partial = _fetch(backend, info["id"], key, "bundle", facts["zip_bytes"], facts["sha256"], out_dir)
        done.append((key, _unpack_bundle(partial, out_dir, key), facts))
        partial.unlink()
    return done


def _wants_coreai(detail: dict, info: dict) -> bool:
    shipped = lambda rows: any(r["status"] == "shipped" for r in (rows or {}).values())  # noqa: E731
    target = ((detail.get("coreml") or {}).get("target") or (detail.get("config") or {}).get("target"))
    return target == "coreai" or (shipped(detail.get("coreai")) and not shipped(info.get("bundles")))


# -- Core AI folders (issue 36): the folder Apple's Core AI exporter writes, zipped under CoreAI/ ----
COREAI_TOP = "CoreAI"  # the zip's one folder (workers.coreai.worker.zip_coreai)
COREAI_REPORT = "mbp-coreai.json"  # in the folder: the search, the recipe, the checks (workers.coreai.bundle)


def _choose_coreai(info: dict, choice: str, where: str) -> dict[str, dict]:
    cm = info.get("coreml") or {}
    none_shipped = (f"search {info['id']} has no shipped Core AI folders (Core ML phase: "
                    f"{cm.get('status', 'never asked')}); build them with `search apply {info['id']}{where} "
                    "--target coreai`" if where else f"search {info['id']} has no shipped Core AI folders; "
                    f"build one here with `search bundle {info['id']} --recipe KEY --target coreai -o DIR`")
    return _choose_shipped(info, info.get("coreai"), choice, "Core AI folder", "Core AI folders", none_shipped)


def _unpack_coreai(zip_path: Path, out_dir: Path, search_id: str, key: str) -> Path:
    """A Core AI folder: its mbp-coreai.json must name this search and recipe."""
    import json

    def check(folder: Path) -> None:
        try:
            report = json.loads((folder / COREAI_REPORT).read_text())
        except ValueError as exc:
            raise CliError(f"{zip_path.name}: {COREAI_REPORT} is not JSON ({exc})") from None
        if (report.get("recipe_key"), report.get("search_id")) != (key, search_id):
            raise CliError(f"the Core AI folder of recipe {key} holds recipe {report.get('recipe_key')!r} of "
                           f"search {report.get('search_id')!r}")

    return _unpack_folder(zip_path, out_dir, key, COREAI_TOP, COREAI_REPORT, check)


def download_coreai(backend, info: dict, choice: str, out_dir: Path) -> list[tuple[str, Path, dict]]:
    """Fetch, check (sha256, then the folder's own report) and unpack the chosen Core AI folders."""
    chosen = _choose_coreai(info, choice, backend.where)
    out_dir.mkdir(exist_ok=True)
    done = []
    for key, facts in chosen.items():
        partial = _fetch(backend, info["id"], key, "coreai", facts["zip_bytes"], facts["sha256"], out_dir)
        done.append((key, _unpack_coreai(partial, out_dir, info["id"], key), facts))
        partial.unlink()
    return done
