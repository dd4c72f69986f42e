"""The Hugging Face Hub: resolving a repo id cheaply (small files only, one-line errors) and
fetching a pipeline's weights with byte progress (`workers.weights.fetch_pipeline`)."""
from __future__ import annotations

import os

from workers.model_spec import REAL_MIN_SIZE, ModelError, ModelSpec, denoiser_folder, describe, read_json


def hub_offline() -> bool:
    """Read HF_HUB_OFFLINE at call time (huggingface_hub only reads it at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _cached_or_download(repo: str, filename: str, offline: bool) -> str | None:
    """Path of a small file of ``repo``: from the cache, else downloaded when online."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str) or offline:
        return cached if isinstance(cached, str) else None
    try:
        return hf_hub_download(repo, filename, etag_timeout=10)
    except Exception:
        return None


def _fetch_model_index(repo: str) -> str:
    """Download model_index.json, turning Hub failures into one-line ModelErrors."""
    import huggingface_hub
    from huggingface_hub import errors

    unreachable = ModelError(f"model '{repo}' is not in the local Hugging Face cache and the Hub "
                             "is unreachable: run with network once, or pass a local pipeline "
                             "directory")
    try:  # one quick request first: hf_hub_download retries for ~20 s when offline
        huggingface_hub.model_info(repo, timeout=10)
        return huggingface_hub.hf_hub_download(repo, "model_index.json", etag_timeout=10)
    except errors.GatedRepoError:
        raise ModelError(f"model '{repo}' is gated: accept its licence on huggingface.co and "
                         "log in (hf auth login), or pass a local pipeline directory") from None
    except errors.RepositoryNotFoundError:
        raise ModelError(f"model '{repo}' does not exist on the Hugging Face Hub (or is private: "
                         "log in with hf auth login)") from None
    except errors.LocalEntryNotFoundError:
        raise unreachable from None
    except errors.EntryNotFoundError:
        raise ModelError(f"'{repo}' is not a diffusers pipeline repository (no model_index.json)"
                         ) from None
    except Exception:  # DNS, proxy, timeouts, HTTP 5xx: all mean "cannot use the Hub now"
        raise unreachable from None


def resolve_hub(requested: str, repo: str) -> ModelSpec:
    index_path = _cached_or_download(repo, "model_index.json", offline=True)
    reached_hub = False  # only download the small configs when the Hub just answered
    if index_path is None:
        if hub_offline():
            raise ModelError(f"model '{repo}' is not in the local Hugging Face cache and "
                             "HF_HUB_OFFLINE is set: run with network once, or pass a local "
                             "pipeline directory")
        index_path, reached_hub = _fetch_model_index(repo), True
    index = read_json(index_path)
    folder = denoiser_folder(index) or "unet"
    denoiser_cfg, vae_cfg = (
        read_json(_cached_or_download(repo, f"{sub}/config.json", offline=not reached_hub))
        for sub in (folder, "vae"))
    facts = describe(index, denoiser_cfg, vae_cfg, repo, hint=repo)
    return ModelSpec(requested, "hub", repo, default_min_size=REAL_MIN_SIZE, **facts)


def hub_download(spec: ModelSpec, download, choose, progress) -> str:
    """Run ``download()`` (it returns the local snapshot folder) while reporting bytes fetched:
    ``progress(done, total)`` about twice a second, from the size of the repo's blobs in the HF
    cache (in-flight ``.incomplete`` files included). ``total`` is the size of the files
    ``choose(names)`` keeps, from the Hub's file metadata (0 when it cannot be asked)."""
    import threading

    from huggingface_hub import constants

    total = 0
    if not hub_offline():
        try:
            import huggingface_hub

            siblings = huggingface_hub.model_info(spec.location, files_metadata=True, timeout=10).siblings
            sizes = {f.rfilename: f.size or 0 for f in siblings}
            total = sum(sizes[name] for name in choose(list(sizes)))
        except Exception:
            total = 0
    blobs = os.path.join(constants.HF_HUB_CACHE, f"models--{spec.location.replace('/', '--')}", "blobs")

    def fetched() -> int:
        try:
            return sum(e.stat().st_size for e in os.scandir(blobs) if e.is_file())
        except OSError:
            return 0

    result: dict = {}

    def run() -> None:
        try:
            result["path"] = download()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=run, name="hub-download", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
        progress(min(fetched(), total) if total else fetched(), total)
    if "error" in result:
        raise result["error"]
    progress(total or fetched(), total or fetched())
    return result["path"]
