"""The Hugging Face Hub: pipeline folders from it (or local ones), checking access before training, the upload.

Only the diffusers pipeline and what its card shows go up (model_index.json, unet/, scheduler/,
README.md, samples.png, loss_curve.png, train_config.json); the Orbax checkpoints, the per-epoch
grids and the logs stay on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

# The RunRecord a train.py output_dir keeps (training/run_folder.py), named here because sample.py
# reads the UNet's config from it before JAX starts, and this module imports no JAX.
RUN_RECORD_FILE = "train_config.json"
UPLOADED = ("model_index.json", "unet/*", "scheduler/*", "README.md", "samples.png", "loss_curve.png",
            RUN_RECORD_FILE)


MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"


def is_pipeline_folder(path: Path) -> bool:
    return (path / MODEL_INDEX).is_file() or ((path / "unet").is_dir() and (path / "scheduler").is_dir())


def resolve_pipeline_folder(path: str | os.PathLike) -> Path:
    """A local diffusers pipeline folder, or a Hub repo id downloaded to the local cache (only
    model_index.json, unet/ and scheduler/)."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir() or not is_pipeline_folder(local):
            raise ValueError(f"{local} is not a diffusers pipeline folder: expected {MODEL_INDEX}, unet/ and "
                             "scheduler/ in it (as DDPMPipeline.save_pretrained or train.py writes)")
        return local
    if str(path).count("/") != 1 or str(path).startswith((".", "/", "~")):
        raise ValueError(f"{path} does not exist, and is not a Hub repo id of the form owner/name")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(path), allow_patterns=["model_index.json", "unet/*", "scheduler/*"]))
    except Exception as error:  # network, authentication, missing repo: all end here
        raise ValueError(f"{path} is not a local folder and could not be downloaded from the Hugging Face Hub "
                         f"({type(error).__name__}: {error}). Check the id, your network, or pass a local "
                         "folder.") from error


def local_unet_config(path: str | os.PathLike) -> dict | None:
    """The UNet's diffusers config of a local model without loading it (or JAX): a pipeline folder's
    unet/config.json, or the train_config.json of a train.py output_dir (or of the run a checkpoint
    folder belongs to). None when there is none to read (a Hub id, an unreadable file)."""
    import json

    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    candidates = [(folder / "unet" / "config.json", None), (folder / RUN_RECORD_FILE, "unet")]
    if folder.parent.name == "checkpoints":  # output_dir/checkpoints/<step>
        candidates.append((folder.parent.parent / RUN_RECORD_FILE, "unet"))
    for file, key in candidates:
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        config = config.get(key) if key else config
        if isinstance(config, dict) and "block_out_channels" in config:
            return config
    return None


def default_repo_name(output_dir: str | Path) -> str:
    """diffusers' default --hub_model_id: the output folder's name."""
    return Path(output_dir).expanduser().resolve().name


def check_hub_access(repo_id: str) -> None:
    """Fail before training if an upload cannot work: a malformed repo id or no token."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"--hub_model_id {repo_id!r} is not a valid Hub repo id ({error}); use 'name' or "
                         "'user/name' with letters, digits, '-', '_' and '.'") from error
    if get_token() is None:
        raise ValueError("--push_to_hub needs a Hugging Face token: run `hf auth login` (or "
                         "`huggingface-cli login`) or set HF_TOKEN, then start again")


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create the repo (if needed) and upload the pipeline folder; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=url.repo_id, folder_path=str(folder), allow_patterns=list(UPLOADED),
                      commit_message="Upload a DDPMPipeline trained with flaxdiff")
    return str(url)
