"""Shared test setup: no network, deterministic seeds, small thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


class FakeHub:
    """Stands in for the Hub behind `Trainer.push_to_hub` (transformers' own path): records the repository created
    and the files of every folder uploaded (no network)."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.uploads: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        import types

        self.created.append(repo_id)
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kwargs):
        import fnmatch

        files = []
        for root, _, names in os.walk(folder_path):
            for name in names:
                path = os.path.relpath(os.path.join(root, name), folder_path)
                if not any(fnmatch.fnmatch(path, pattern) for pattern in ignore_patterns or ()):
                    files.append(path)
        self.uploads.append(
            {
                "repo_id": repo_id,
                "files": sorted(files),
                "readme": _read(os.path.join(folder_path, "README.md")),
                "config": _read(os.path.join(folder_path, "config.json")),
                **kwargs,
            }
        )
        if kwargs.get("run_as_future"):  # the Trainer's checkpoint pushes wait on these
            from concurrent.futures import Future

            done: Future = Future()
            done.set_result(None)
            return done
        return None


def _read(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return handle.read()


@pytest.fixture
def fake_hub(monkeypatch):
    """`FakeHub` under transformers' Trainer (5.24: `hf_api()`; 5.9: module-level `create_repo` / `upload_folder`)."""
    import transformers.trainer

    hub = FakeHub()
    if hasattr(transformers.trainer, "hf_api"):
        monkeypatch.setattr(transformers.trainer, "hf_api", lambda *args, **kwargs: hub)
    else:
        monkeypatch.setattr(transformers.trainer, "create_repo", hub.create_repo)
        monkeypatch.setattr(transformers.trainer, "upload_folder", hub.upload_folder)
    return hub
