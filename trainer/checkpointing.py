"""Crash-safe checkpoints: each is written into a staging folder, flushed, then renamed into place whole."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

# checkpoints are written here and renamed into place when complete (hidden from get_last_checkpoint and
# from push_to_hub, which ignores "_*")
CHECKPOINT_STAGING_DIR = "_checkpoint-staging"
TRAINER_STATE_NAME = "trainer_state.json"


class StagedCheckpointsMixin:
    """For a `Trainer`: its checkpoints written whole or not at all (`publish_checkpoint`)."""

    _checkpoint_staging_root: str | None = None  # set while `_save_checkpoint` writes

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into `<output_dir>/_checkpoint-staging/checkpoint-N` and renamed to
        `<output_dir>/checkpoint-N` only when every process has written its files. A stop in the middle of a save
        leaves nothing that `get_last_checkpoint` / `--resume_from_checkpoint last` would take for a checkpoint;
        `save_total_limit` removes old checkpoints by renaming them away first, for the same reason."""
        run_dir = self._get_output_dir(trial=trial)
        staging_root = os.path.join(run_dir, CHECKPOINT_STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # left by a stop during an earlier save
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best is not None and os.path.dirname(best) == staging_root:
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
            publish_checkpoint(staged, final)
            self._rotate_published_checkpoints(run_dir, staging_root)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial) -> str:
        if self._checkpoint_staging_root is not None:  # inside _save_checkpoint: write into the staging folder
            return self._checkpoint_staging_root
        return super()._get_output_dir(trial)

    def _rotate_published_checkpoints(self, run_dir: str, staging_root: str) -> None:
        """`save_total_limit` as the Trainer applies it (newest and best kept), each removal a rename then a delete."""
        limit = self.args.save_total_limit
        if not limit or limit <= 0:
            return
        checkpoints = newest_last(run_dir)
        if not checkpoints:
            return
        best = self.state.best_model_checkpoint
        protected = {checkpoints[-1]} | ({str(Path(best))} if best else set())
        surplus = len(checkpoints) - max(limit, len(protected))
        for path in [path for path in checkpoints if path not in protected][: max(surplus, 0)]:
            trash = os.path.join(staging_root, f"deleting-{os.path.basename(path)}")
            shutil.rmtree(trash, ignore_errors=True)  # left by a stop during an earlier removal
            os.makedirs(staging_root, exist_ok=True)
            os.replace(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
        remove_if_empty(staging_root)


def newest_last(run_dir: str) -> list[str]:
    """The published `checkpoint-N` folders of `run_dir`, oldest first: by time written, then by step. (transformers'
    `sort_checkpoints(use_mtime=True)` also warns, with nothing for a user to do, when they were written within a
    second, as a small run's are.)"""
    folders = [path for path in Path(run_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if path.is_dir()]

    def order(path: Path) -> tuple[float, int]:
        step = path.name.rpartition("-")[2]
        return path.stat().st_mtime, int(step) if step.isdigit() else -1

    return [str(path) for path in sorted(folders, key=order)]


def _fsync(path: str) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def match_sibling_modes(folder: str | Path) -> None:
    """Gives each `*.safetensors` file under `folder` the permissions of a file beside it. safetensors 0.8 writes
    through a temporary file created with mode 0600 and renames it into place (safetensors/safetensors issue 782),
    while every other file of a save gets the umask's mode (0644 under the usual umask 022)."""
    for directory in {path.parent for path in Path(folder).rglob("*.safetensors")}:
        sibling = next((p for p in directory.iterdir() if p.is_file() and p.suffix != ".safetensors"), None)
        if sibling is not None:
            for path in directory.glob("*.safetensors"):
                path.chmod(stat.S_IMODE(sibling.stat().st_mode))


def publish_checkpoint(staged: str, final: str) -> None:
    """Flush the staged files to disk, then rename the folder into place (atomic within one file system)."""
    match_sibling_modes(staged)
    for folder, _, files in os.walk(staged):
        for file in files:
            _fsync(os.path.join(folder, file))
        _fsync(folder)
    trash = None
    if os.path.exists(final):  # the same step saved again (a run resumed from an earlier checkpoint)
        trash = f"{staged}.replaced"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(staged, final)
    _fsync(os.path.dirname(final))
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    remove_if_empty(os.path.dirname(staged))


def remove_if_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass
