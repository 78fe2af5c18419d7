"""Downloads from the Hugging Face Hub: only the files the runtime reads, resumable, cached.

`huggingface_hub.snapshot_download` does the work (resume, progress bars, the shared cache in
~/.cache/huggingface or $HF_HOME). A repository already in the cache is used without touching
the network; set HF_HUB_OFFLINE=1 to forbid it entirely.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from runtime.errors import CheckpointError

ALLOW_PATTERNS = ["config.json", "generation_config.json", "*.safetensors",
                  "model.safetensors.index.json", "tokenizer.model", "tokenizer.json",
                  "tokenizer_config.json", "special_tokens_map.json"]


def download(repo_id: str, revision: Optional[str] = None,
             cache_dir: Optional[Path] = None) -> Path:
    """The local folder of `repo_id` (downloading what is missing), as a Path."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise CheckpointError(f"--hf-repo {repo_id!r}: expected ORG/NAME")
    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                  allow_patterns=ALLOW_PATTERNS)
    try:  # a complete cached snapshot needs no network at all
        return Path(snapshot_download(local_files_only=True, **kwargs))
    except LocalEntryNotFoundError:
        pass
    try:
        return Path(snapshot_download(**kwargs))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"--hf-repo {repo_id}: not in the local cache and the Hub cannot be "
                              f"reached (offline?)") from None
    except HfHubHTTPError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"--hf-repo {repo_id}: download failed: {first}") from None
