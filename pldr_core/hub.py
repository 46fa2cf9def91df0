"""Upload an exported model directory to the Hugging Face Hub (needs the network and a token)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from pldr_core.errors import PLDRError
from pldr_core.export import exported_files


def check_repo_id(repo: str) -> str:
    """``repo`` ('name' or 'owner/name') when the Hub would accept it; PLDRError otherwise."""
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise PLDRError(f"--repo {repo!r} is not a valid Hub repository name ({str(exc).splitlines()[0]})") from None
    return repo


def push_plan(folder: str | Path, repo: str) -> list[str]:
    """The files (relative paths) ``push_folder`` would upload, after checking folder and repo name."""
    check_repo_id(repo)
    folder = Path(folder)
    return [str(p.relative_to(folder)) for p in exported_files(folder)]


def push_folder(folder: str | Path, repo: str, *, token: str | None = None, private: bool = False,
                message: str = "Upload PLDR-LLM") -> str:
    """Create ``repo`` if needed and upload ``folder`` to it; returns the commit URL."""
    files = push_plan(folder, repo)
    token = token or get_token()
    if not token:
        raise PLDRError("pushing needs a Hugging Face token: pass --token, set HF_TOKEN, or run "
                        "`huggingface-cli login`")
    api = HfApi(token=token)
    api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=message,
                             allow_patterns=files)
    return str(getattr(info, "commit_url", info))
