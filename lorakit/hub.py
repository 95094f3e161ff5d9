"""PeftModel.push_to_hub: the adapter folder save_pretrained writes (adapter files, lorakit.json, README.md model card)
uploaded to a Hugging Face Hub model repository, as PEFT's push_to_hub uploads it. Without the network (or with
HF_HUB_OFFLINE=1) it raises ModelLoadError saying so and how to upload the folder later; nothing is half-written."""
from __future__ import annotations

import tempfile
from typing import Any, Optional, Sequence

from .errors import ModelLoadError


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the Hub cannot be reached" (offline mode, no route, DNS, timeouts)."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        errors.append(requests.exceptions.ConnectionError)
    except ImportError:
        pass
    return tuple(errors)


def push_to_hub(model, repo_id: str, *, commit_message: Optional[str] = None, private: Optional[bool] = None,
                token: Optional[str | bool] = None, create_pr: bool = False, revision: Optional[str] = None,
                commit_description: Optional[str] = None, selected_adapters: Optional[Sequence[str]] = None,
                **save_kwargs: Any):
    """Save `model`'s adapters to a temporary folder and upload it to `repo_id` (created if missing).

    Returns:
        huggingface_hub's CommitInfo of the upload.
    Raises:
        ModelLoadError: the Hub cannot be reached (offline); the adapter is not uploaded.
    """
    try:
        from huggingface_hub import HfApi
    except ImportError as err:  # transformers depends on it, so this is an unusual install
        raise ModelLoadError("push_to_hub needs the huggingface_hub package: pip install huggingface_hub") from err
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="lorakit-push-") as folder:
        model.save_pretrained(folder, selected_adapters=selected_adapters, **save_kwargs)
        try:
            api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                     commit_message=commit_message or "Upload LoRA adapter (lorakit)",
                                     commit_description=commit_description, create_pr=create_pr)
        except _unreachable_errors() as err:
            raise ModelLoadError(
                f"push_to_hub({repo_id!r}): the Hugging Face Hub cannot be reached ({type(err).__name__}: {err}). "
                "Nothing was uploaded. Save the adapter with model.save_pretrained(FOLDER) and upload it when online, "
                f"e.g. `hf upload {repo_id} FOLDER` (unset HF_HUB_OFFLINE if it is set)") from err
