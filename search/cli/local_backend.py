"""The local database as the commands' backend: searches run in this process, on a local Ray
instance or the cluster at --ray-address (the interface is described in search.cli.backend)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from common.clock import utcnow
from search.cli.console import CliError, duplicate_error, err
from search.cli.options import DB_ENV, default_db
from search import read_models
from search.read_models import search_detail, search_summary
from search.submit_options import parse_apply, parse_search_options
from storage import DiskError, Storage
from storage.records import ACTIVE


class Tee:
    """One driver reporter feeding two: the terminal's bars and the progress file."""

    def __init__(self, *reporters):
        self.reporters = reporters

    def phase_start(self, phase: str, total: int) -> None:
        for r in self.reporters:
            r.phase_start(phase, total)

    def advance(self, phase: str, n: int = 1) -> None:
        for r in self.reporters:
            r.advance(phase, n)

    def phase_end(self, phase: str) -> None:
        for r in self.reporters:
            r.phase_end(phase)

    def message(self, text: str) -> None:
        for r in self.reporters:
            r.message(text)


class LocalBackend:
    runs_here = True
    where = ""

    def __init__(self, db: Optional[Path]):
        self.db_path = db or default_db()
        self._storage: Storage | None = None
        self._prepared: dict = {}  # search id -> Prepared, from submit/resume for run
        self.creates = False  # set by submit: the one command that may create the database

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc) -> None:
        if self._storage is not None:
            self._storage.close()

    @property
    def storage(self) -> Storage:
        """The database; only `submit` creates it (``self.creates``): any other command on a path
        where none exists (a typo in --db) is refused and leaves no file behind."""
        if self._storage is None:
            if not self.creates and not Path(self.db_path).expanduser().exists():
                raise CliError(f"no database at {self.db_path}: nothing was searched there yet (`search submit` "
                               f"creates it; --db or {DB_ENV} picks another)")
            self._storage = Storage(self.db_path)
        return self._storage

    @property
    def place(self) -> str:
        return f"in {self._storage.path if self._storage else Path(self.db_path).expanduser()}"

    @property
    def resume_where(self) -> str:
        return f" --db {self.storage.path}" if os.environ.get(DB_ENV) is None else ""

    # -- reading ----------------------------------------------------------------------------
    def list(self) -> list[dict]:
        if not Path(self.db_path).expanduser().exists():
            return []  # nothing searched here yet: an empty list, and no file created
        now = utcnow()
        return [search_summary(self.storage, s, now) for s in self.storage.list_searches()]

    def detail(self, search_id: str) -> dict:
        from search.phase_rows import phase_rows
        from search.service.progress_file import read_progress

        info = search_detail(self.storage, self.storage.get_search(search_id))
        progress = read_progress(self.progress_path(info["id"]))
        return {**info, "progress": progress, "phases": phase_rows(progress, utcnow() if info["status"] in ACTIVE
                                                                      else None)}

    def progress_path(self, sid: str) -> Path:
        """Where a search run here keeps its progress file: where `search serve --db` on the same
        database reads it (its default --data-dir), so a search run by the CLI shows the same
        phases and messages on the dashboard as one run by the service."""
        db = Path(self.db_path).expanduser().resolve()
        return db.with_name(db.name + ".service") / "progress" / f"{sid}.json"

    def recipes_json(self, search_id: str) -> tuple[str, dict]:
        s = self.storage.get_search(search_id)
        return read_models.recipes_json(self.storage, s), {"recipes": len(self.storage.recipes(s.id)),
                                               "status": s.effective_status(utcnow())}

    def plot_png(self, search_id: str) -> bytes:
        return read_models.plot_png(self.storage, self.storage.get_search(search_id))

    def coreml(self, search_id: str) -> dict:
        s = self.storage.get_search(search_id)
        return {"id": s.id, "status": s.effective_status(utcnow()),
                "coreml": read_models.coreml_progress(self.storage, s), "bundles": read_models.bundles(self.storage, s)}

    def fetch_package(self, search_id: str, key: str, fh, kind: str = "mlpackage") -> None:
        """Append the stored zip of ``key``'s package or bundle (``kind``) from ``fh``'s current size
        on (as the remote one resumes)."""
        import shutil

        from storage.coreml_store import CoreMLStore
        from storage.package_store import PackageStore

        store = CoreMLStore(self.storage)
        if kind == "coreai":  # a Core AI folder's zip (issue 36)
            from storage.coreai_store import CoreAIStore

            p = CoreAIStore(self.storage).bundles(search_id)[key]
        else:
            p = (store.packages if kind == "mlpackage" else store.bundles)(search_id)[key]
        with open(PackageStore.beside(self.storage.path).path(p.path), "rb") as src:
            src.seek(fh.tell())
            shutil.copyfileobj(src, fh, 8 * 2**20)

    # -- changing ---------------------------------------------------------------------------
    def cancel(self, search_id: str) -> dict:
        s = self.storage.get_search(search_id)
        if not self.storage.request_cancel(s.id):
            raise CliError(f"search {s.id} is not running (status {s.effective_status(utcnow())})")
        return search_summary(self.storage, s)

    def submit(self, request: dict) -> dict:
        """Resolve the model and store the search (or find the unfinished one with the same model
        and config, with ``resume``); its weights are fetched and fingerprinted by `run`, the
        search's preparing phase. Bad input never touches the database."""
        from search.driver.jobs import DuplicateSearch, resolve_config, submit_search
        from storage.engine import check_database_file
        from workers.models import model_options, resolve_model

        options = parse_search_options(request)
        check_database_file(self.db_path)  # read-only: refuse a foreign file before any work
        spec = resolve_model(request["model"], **model_options(options))
        resolve_config(spec, **options)
        self.creates = True
        try:
            prepared = submit_search(self.storage, request["model"], options, spec,
                                     resume_duplicate=bool(request.get("resume")))
        except DuplicateSearch as exc:
            raise duplicate_error(str(exc), exc.existing.id, self.where) from None
        if request.get("apply"):  # the Core ML stage after the recipes (search.driver.coreml_phase)
            from storage.coreml_store import CoreMLStore

            CoreMLStore(self.storage).request(prepared.search.id, *parse_apply(request["apply"],
                                                                               request.get("coreml_node")))
        self._prepared[prepared.search.id] = prepared
        return {**search_summary(self.storage, prepared.search), "created": prepared.created}

    def resume(self, search_id: str, workers: Optional[int] = None) -> dict:
        from search.driver.jobs import prepare_resume

        prepared = prepare_resume(self.storage, search_id)
        self._prepared[prepared.search.id] = prepared
        return search_summary(self.storage, prepared.search)

    def run(self, search_id: str, workers: Optional[int] = None, ray_address: Optional[str] = None):
        """Run the submitted or resumed search here, with the driver's progress bars."""
        from search.driver.cluster import shutdown_ray
        from search.driver.driver import SearchFailed, SearchInterrupted
        from search.driver.jobs import run_search
        from search.driver.progress import console_reporter

        from search.service.progress_file import ProgressFile

        prepared = self._prepared.pop(search_id)
        try:
            with console_reporter(err) as reporter:
                tee = Tee(reporter, ProgressFile(self.progress_path(search_id), run=f"cli@{os.getpid()}"))
                _, driver = run_search(self.storage, prepared, workers=workers, reporter=tee,
                                       ray_address=ray_address)
            ended = {"status": "completed", "evaluations": driver.evaluations,
                     "reference_runs": driver.reference_runs, "first_result_s": driver.first_result_s,
                     "timings": driver.timings}
        except (SearchInterrupted, KeyboardInterrupt):  # KeyboardInterrupt: before the driver took over
            cancelled = self.storage.get_search(search_id).status == "cancelled"  # `search cancel`, not a signal
            ended = {"status": "cancelled" if cancelled else "interrupted"}
        except SearchFailed as exc:
            ended = {"status": "failed", "error": str(exc)}
        except DiskError as exc:  # nothing stored is lost: the same search resumes once the disk takes writes
            raise CliError(f"search {search_id} stopped: {exc}, then run `search resume {search_id}{self.resume_where}`",
                           1) from None
        finally:
            shutdown_ray()
        return self.detail(search_id), ended

    def target_recipe(self, search_id: str, *, bits, size_mb, psnr, workers: int, ray_address: Optional[str],
                      refine_evals: Optional[int] = None) -> dict:
        """Build, store and measure the optimal recipe for one target (local only)."""
        from search.driver.cluster import shutdown_ray
        from search.driver.driver import SearchInterrupted
        from search.driver.jobs import target_recipe
        from search.driver.progress import console_reporter

        try:
            with console_reporter(err) as reporter:
                r, _, refined = target_recipe(self.storage, search_id, bits=bits, size_mb=size_mb, psnr=psnr,
                                              workers=workers, reporter=reporter, ray_address=ray_address,
                                              refine_evals=refine_evals)
        except (SearchInterrupted, KeyboardInterrupt):
            raise CliError(f"interrupted: every measurement received is stored; `search recipe {search_id} ...` "
                           "again continues the refinement", 130) from None
        finally:
            shutdown_ray()
        return {"key": r.key, "target": r.target, "avg_bits": r.avg_bits, "size_mb": r.size_mb,
                "predicted_psnr": r.predicted_psnr, "psnr": r.psnr,
                "refined": None if refined is None else {"evals": refined.evals, "start": refined.start,
                                                         "start_psnr": refined.start_psnr}}
