"""Resolving model sources (hub ids or local folders) into files, with errors a user can act on.

Hub lookups fail fast without a network: before asking the hub, one short HTTP probe of the
endpoint (``HF_ENDPOINT``) checks that it answers at all, within ``LINFUSION_HUB_PROBE_TIMEOUT``
seconds (default 3). If it does not, the files are taken from the local hub cache only, so
huggingface_hub's retries (about 25 s of "Retrying in ..." lines) never start. ``HF_HUB_OFFLINE``
and ``local_files_only`` skip the probe and use only the cache.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# CLI wording of the offline remedies, for ``ModelSourceError.cli_hint``.
OFFLINE_HINT = ("pass --random-weights to build the architecture offline with random weights, "
                "or a local folder that holds the files")
DEFAULT_CLI_HINT = "pass a local folder that holds the files, or run once with network access to fill the cache"
DEFAULT_PROBE_TIMEOUT_S = 3.0
_PROBE_TTL_S = 30.0
_PROBES: dict[str, tuple[float, str | None]] = {}
"""Probe results by endpoint: (monotonic time, None if reachable else why not); reused for 30 s."""


class ModelSourceError(RuntimeError):
    """A model could not be found or fetched: unknown name, no network, or missing files.

    ``str(exc)`` is one line naming the remedy in Python API terms. ``problem`` is that line
    without the remedy, and ``cli_hint`` (None when there is nothing CLI-specific) is the remedy in
    command-line terms, so that a CLI can print ``f"{exc.problem}; {exc.cli_hint}"``.
    """

    def __init__(self, problem: str, remedy: str | None = None, cli_hint: str | None = None) -> None:
        super().__init__(f"{problem}; {remedy}" if remedy else problem)
        self.problem = problem
        self.remedy = remedy
        self.cli_hint = cli_hint

    def __reduce__(self):
        return type(self), (self.problem, self.remedy, self.cli_hint)


class HubUnavailableError(ModelSourceError):
    """Files are not in the local hub cache and the hub cannot be asked (offline or unreachable)."""

    def __init__(self, source: str, reason: str, remedies: tuple[str, ...] = (),
                 cli_hint: str | None = None) -> None:
        self.source, self.reason, self.remedies = source, reason, remedies
        options = [*(remedies or ("pass a local folder that holds the files",)),
                   "run once with network access to fill the cache"]
        super().__init__(f"'{source}' is not in the local hub cache ({hub_cache_dir()}) and {reason}",
                         ", ".join(options[:-1]) + ", or " + options[-1], cli_hint or DEFAULT_CLI_HINT)

    def __reduce__(self):
        return type(self), (self.source, self.reason, self.remedies, self.cli_hint)

    def with_remedies(self, remedies: tuple[str, ...], cli_hint: str | None) -> HubUnavailableError:
        """The same error with remedies that fit the caller (e.g. ``random_weights=True`` for a preset)."""
        return HubUnavailableError(self.source, self.reason, remedies, cli_hint)


@dataclass(frozen=True)
class ResolvedFiles:
    """Local paths of the requested files, and the hub revision they came from (None if local)."""

    paths: dict[str, Path]
    source: str
    revision: str | None
    offline: bool = False
    """True when the files came from the cache without asking the hub (offline or unreachable)."""


_SNAPSHOT_RE = re.compile(r"snapshots[\\/]([0-9a-f]{40})[\\/]")


def resolve_files(source: str, filenames: list[str], revision: str | None = None,
                  local_files_only: bool = False, subfolder: str | None = None) -> ResolvedFiles:
    """Find ``filenames`` in a local folder, or download them from the hub repo ``source``.

    Only the named files are fetched, so a repo's pickle files are never downloaded. Without a
    reachable hub the local cache is used, and a miss fails within the probe timeout.
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

    offline_reason = None
    if local_files_only:
        offline_reason = "offline mode is on (local_files_only)"
    elif offline_mode():
        offline_reason = "HF_HUB_OFFLINE is set"
    else:
        why = hub_unreachable_reason()
        if why is not None:
            offline_reason = f"the hub at {hub_endpoint()} is unreachable ({why})"
    paths = {}
    for name in filenames:
        try:
            paths[name] = Path(hf_hub_download(source, name, subfolder=subfolder, revision=revision,
                                               local_files_only=offline_reason is not None))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
            raise HubUnavailableError(
                source, offline_reason or f"the hub could not be reached ({first_line(exc)})") from exc
        except (RepositoryNotFoundError, GatedRepoError) as exc:
            raise ModelSourceError(f"unknown or gated hub repo '{source}' ({type(exc).__name__})",
                                   "check the name and your hub token, or pass a local folder that holds "
                                   "the files", "check the name and your hub token, or pass a local folder "
                                   "that holds the files") from exc
        except RevisionNotFoundError as exc:
            raise ModelSourceError(f"hub repo '{source}' has no revision '{revision}'") from exc
        except EntryNotFoundError as exc:
            raise ModelSourceError(f"hub repo '{source}' has no file {name}") from exc
        except HfHubHTTPError as exc:
            raise ModelSourceError(f"hub request for '{source}' failed: {first_line(exc)}") from exc
    first = str(next(iter(paths.values())))
    match = _SNAPSHOT_RE.search(first)
    return ResolvedFiles(paths, source, match.group(1) if match else revision, offline_reason is not None)


def offline_mode() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def probe_timeout() -> float:
    try:
        return float(os.environ.get("LINFUSION_HUB_PROBE_TIMEOUT", DEFAULT_PROBE_TIMEOUT_S))
    except ValueError:
        return DEFAULT_PROBE_TIMEOUT_S


def hub_unreachable_reason(endpoint: str | None = None) -> str | None:
    """None if ``endpoint`` (default: the configured hub) answers any HTTP request, else why not.

    The request runs in a daemon thread joined with a deadline, so that slow DNS, a black-holed
    address or a server that accepts but never answers cannot hold the caller longer than the
    probe timeout. Results are reused for 30 s, so one model load probes once.
    """
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    cached = _PROBES.get(endpoint)
    if cached is not None and time.monotonic() - cached[0] < _PROBE_TTL_S:
        return cached[1]
    timeout = probe_timeout()
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            from huggingface_hub.utils import get_session

            get_session().head(endpoint + "/", timeout=timeout)  # any HTTP status means reachable
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - every failure means "not reachable"
            outcome.append(first_line(exc) or type(exc).__name__)

    thread = threading.Thread(target=probe, name="linfusion-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    reason = outcome[0] if outcome else f"no answer within {timeout:g} s"
    if reason is not None:
        logger.info("the hub at %s is unreachable (%s); using the local cache only", endpoint, reason)
    _PROBES[endpoint] = (time.monotonic(), reason)
    return reason


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def looks_like_path(source: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else with separators or dots is a path."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source)
