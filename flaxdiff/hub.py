"""Sharing a trained model on the Hugging Face Hub: checking access before training, the upload.

Only the diffusers pipeline and what its card shows go up (model_index.json, unet/, scheduler/,
README.md, samples.png, loss_curve.png, train_config.json); the Orbax checkpoints, the per-epoch
grids and the logs stay on disk.
"""

from __future__ import annotations

from pathlib import Path

UPLOADED = ("model_index.json", "unet/*", "scheduler/*", "README.md", "samples.png", "loss_curve.png",
            "train_config.json")


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
