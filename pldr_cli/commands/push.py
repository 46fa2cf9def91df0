"""pldr push: upload an exported model directory to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import typer

from pldr_cli._common import console, handle_errors, print_json

EPILOG = """Examples:

  pldr push export/small-hf --repo me/pldr-small --dry-run

  pldr push export/small-hf --repo me/pldr-small --private

  HF_TOKEN=hf_... pldr push export/small-hf --repo me/pldr-small

This needs the network and a Hugging Face token with write access (--token, the HF_TOKEN variable, or `huggingface-cli login`). Make the folder first with `pldr export MODEL --format hf --out DIR`, which also writes the model card (README.md). --dry-run checks the folder and the repository name and lists the files it would upload, without any network access."""


def register(app: typer.Typer) -> None:
    app.command("push", epilog=EPILOG, help="Upload an exported model directory to the Hugging Face Hub "
                "(needs the network and a token).")(push)


@handle_errors
def push(
    model: Path = typer.Argument(..., help="Exported model directory (HF pldrllm layout or ours)."),
    repo: str = typer.Option(..., "--repo", help="Hub repository, 'owner/name' or 'name'."),
    token: str = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or the saved login)."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    message: str = typer.Option("Upload PLDR-LLM", "--message", "-m", help="Commit message."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files that would be uploaded; no network."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    from pldr_core.hub import push_folder, push_plan

    files = push_plan(model, repo)
    c = console()
    if dry_run:
        if as_json:
            print_json({"repo": repo, "folder": str(model), "files": files, "dry_run": True})
            return
        c.print(f"would upload {len(files)} file(s) from [bold]{model}[/] to {repo}:", soft_wrap=True)
        for name in files:
            print(f"  {name}")
        return
    url = push_folder(model, repo, token=token, private=private, message=message)
    if as_json:
        print_json({"repo": repo, "folder": str(model), "files": files, "commit_url": url})
        return
    c.print(f"uploaded {len(files)} file(s) to [bold]{repo}[/]: {url}", soft_wrap=True)
