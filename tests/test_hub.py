"""Sharing: the model card train.py writes and --push_to_hub, tested up to the network call."""

import pytest
from huggingface_hub import HfApi, RepoUrl
from huggingface_hub.utils import filter_repo_objects

import train as train_cli
from cli_runs import flags


@pytest.fixture()
def hub_calls(monkeypatch):
    """HfApi with its two network calls replaced by recorders."""
    calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        calls.append(("create_repo", repo_id, private, self.token))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, **kwargs):
        calls.append(("upload_folder", repo_id, folder_path, allow_patterns))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_train_writes_a_card_and_pushes_only_the_pipeline(micro_config, tmp_path, hub_calls, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "run"
    assert train_cli.main(flags(micro_config, out, "--push_to_hub", "--hub_model_id", "someone/shapes-ddpm",
                                "--hub_private_repo", steps=8)) == 0
    card = (out / "README.md").read_text()
    for tag in ("diffusers", "unconditional-image-generation", "diffusion-models-class", "jax", "flax"):
        assert f"\n- {tag}\n" in card, tag
    assert "DDPMPipeline.from_pretrained('someone/shapes-ddpm')" in card
    assert "![samples](samples.png)" in card and "| optimizer steps | 8 |" in card
    assert hub_calls[0] == ("create_repo", "someone/shapes-ddpm", True, None)
    kind, repo, folder, patterns = hub_calls[1]
    assert (kind, repo, folder) == ("upload_folder", "someone/shapes-ddpm", str(out))
    files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(files, allow_patterns=patterns))
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "README.md", "samples.png", "loss_curve.png"} <= uploaded
    assert not [f for f in uploaded if f.startswith(("checkpoints", "samples/")) or f == "metrics.jsonl"]
    assert any(f.startswith("checkpoints/") for f in files)  # they exist, and stay local


def cli_error(capsys, args) -> str:
    assert train_cli.main(args) == 2
    return capsys.readouterr().err


def test_push_without_a_token_fails_before_training(capsys, tmp_path, monkeypatch, hub_calls):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token either
    message = cli_error(capsys, ["--push_to_hub", "--output_dir", str(tmp_path / "o")])
    assert "needs a Hugging Face token" in message and "hf auth login" in message
    assert not (tmp_path / "o").exists() and hub_calls == []


def test_bad_hub_flags(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    assert "only apply with --push_to_hub" in cli_error(capsys, ["--hub_model_id", "me/x",
                                                                  "--output_dir", str(tmp_path / "o")])
    assert "is not a valid Hub repo id" in cli_error(capsys, ["--push_to_hub", "--hub_model_id", "me/bad name",
                                                              "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
