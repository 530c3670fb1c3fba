"""Where `--model_name_or_path` points, checked before anything loads: a local folder, or a Hub repo that exists (or
is cached). A missing folder fails at once with the names beside it; a Hub id fails within `HUB_TIMEOUT` seconds
when the Hub does not answer, instead of transformers' minutes of retries."""

from __future__ import annotations

import difflib
import logging
import os
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, try_to_load_from_cache
from huggingface_hub.errors import HTTPError, RepositoryNotFoundError

from .errors import UserFileNotFoundError

logger = logging.getLogger(__name__)

HUB_TIMEOUT = 10.0  # seconds to wait for the Hub's answer about a repo
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+|[\w.-]+")  # owner/name, or a legacy canonical name (gpt2)


def check_model_source(name: str | None) -> None:
    """Raises a [`~cfmoe.trainer.errors.UserFileNotFoundError`] naming `--model_name_or_path` unless `name` is None
    (the tiny default), a folder with a `config.json`, or a Hub repo id that exists or is cached. When the Hub is
    unreachable and the repo is cached, the process goes offline, so that loading reads the cache at once."""
    if name is None:
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            kind = "a folder" if path.is_dir() else "a file"
            raise UserFileNotFoundError(
                f"--model_name_or_path {name}: {kind} without config.json, not a saved model folder"
            )
        return
    if _looks_local(name, path):
        raise UserFileNotFoundError(f"--model_name_or_path {name}: folder not found{_near_names(name, path)}")
    _check_hub_repo(name)


def _looks_local(name: str, path: Path) -> bool:
    """Whether `name` is meant as a path rather than a Hub id: not of a repo id's form (absolute, `./x`, `a/b/c`),
    hidden or under `~`, its first part is here on disk, or folders here have names close to it (a typo)."""
    return (
        not REPO_ID.fullmatch(name)
        or name.startswith((".", "~"))
        or Path(path.parts[0]).exists()
        or bool(_close_siblings(path))
    )


def _close_siblings(path: Path) -> list[str]:
    """The folders beside `path` whose names are close to its name."""
    if not path.parent.is_dir():
        return []
    siblings = [entry.name for entry in path.parent.iterdir() if entry.is_dir()]
    return difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.6)


def _near_names(name: str, path: Path) -> str:
    """'; did you mean ...?' with the close folders beside `path`, written as `name` writes its folder; or which
    folder above it is missing; '' when neither helps."""
    close = _close_siblings(path)
    if close:
        folder = name[: len(name) - len(path.name)] if name.endswith(path.name) else f"{path.parent}/"
        return f"; did you mean {' or '.join(folder + match for match in close)}?"
    missing = next((folder for folder in reversed(path.parents) if not folder.is_dir()), None)
    return f" ({missing} does not exist)" if missing is not None else ""


def _check_hub_repo(repo_id: str) -> None:
    cached = isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    where = f"--model_name_or_path {repo_id}: no such local folder"
    if huggingface_hub.constants.is_offline_mode():
        if not cached:
            raise UserFileNotFoundError(f"{where}, and not in the Hub cache (HF_HUB_OFFLINE is set: no download)")
        return
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT)
    except RepositoryNotFoundError as error:
        raise UserFileNotFoundError(
            f"{where}, and no model {repo_id} on the Hub (a private or gated repo needs `hf auth login`)"
        ) from error
    except (HTTPError, OSError) as error:
        if not cached:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise UserFileNotFoundError(
                f"{where}; the Hub is unreachable ({reason}) and it is not in the Hub cache: check the connection, "
                f"or download it where the Hub is reachable (hf download {repo_id})"
            ) from error
        logger.warning("the Hub is unreachable (%s): %s is read from the Hub cache, offline", error, repo_id)
        # transformers reads this switch on every call; the variable is for child processes (DataLoader workers)
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"
