"""Resolving model sources (hub ids or local folders) into files, with errors a user can act on."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

OFFLINE_HINT = ("pass --random-weights to build the architecture offline with random weights, "
                "or a local folder that holds the files")


class ModelSourceError(RuntimeError):
    """A model could not be found or fetched: unknown name, no network, or missing files."""


@dataclass(frozen=True)
class ResolvedFiles:
    """Local paths of the requested files, and the hub revision they came from (None if local)."""

    paths: dict[str, Path]
    source: str
    revision: str | None


_SNAPSHOT_RE = re.compile(r"snapshots[\\/]([0-9a-f]{40})[\\/]")


def resolve_files(source: str, filenames: list[str], revision: str | None = None,
                  local_files_only: bool = False, subfolder: str | None = None) -> ResolvedFiles:
    """Find ``filenames`` in a local folder, or download them from the hub repo ``source``.

    Only the named files are fetched, so a repo's pickle files are never downloaded.
    """
    local = Path(source).expanduser()
    if local.is_dir():
        folder = local / subfolder if subfolder else local
        paths = {}
        for name in filenames:
            path = folder / name
            if not path.is_file():
                raise ModelSourceError(f"{folder} has no {name}")
            paths[name] = path
        return ResolvedFiles(paths, str(local.resolve()), None)
    if looks_like_path(source):
        raise ModelSourceError(f"no such folder: {source}")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    paths = {}
    for name in filenames:
        try:
            paths[name] = Path(hf_hub_download(source, name, subfolder=subfolder, revision=revision,
                                               local_files_only=local_files_only))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
            raise ModelSourceError(
                f"cannot reach the hub for '{source}' and it is not in the local cache; "
                f"{OFFLINE_HINT}") from exc
        except (RepositoryNotFoundError, GatedRepoError) as exc:
            raise ModelSourceError(f"unknown or gated hub repo '{source}' ({type(exc).__name__}); "
                                   f"check the name, your token, or {OFFLINE_HINT}") from exc
        except RevisionNotFoundError as exc:
            raise ModelSourceError(f"hub repo '{source}' has no revision '{revision}'") from exc
        except EntryNotFoundError as exc:
            raise ModelSourceError(f"hub repo '{source}' has no file {name}") from exc
        except HfHubHTTPError as exc:
            raise ModelSourceError(f"hub request for '{source}' failed: {exc}") from exc
    first = str(next(iter(paths.values())))
    match = _SNAPSHOT_RE.search(first)
    return ResolvedFiles(paths, source, match.group(1) if match else revision)


def looks_like_path(source: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else with separators or dots is a path."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source)
