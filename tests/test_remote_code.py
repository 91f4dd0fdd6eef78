"""Saved folders load where this package is NOT importable (how the Hub serves them with trust_remote_code)."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import AutoModelForMaskedImageModeling

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator

HIDDEN_PACKAGE_LOADER = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_simmim"] = None  # makes `import modeling_simmim` raise ImportError, installed or not
    try:
        import modeling_simmim  # noqa: F401
        raise SystemExit("modeling_simmim should not be importable here")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForMaskedImageModeling
    folder = sys.argv[1]
    model = AutoModelForMaskedImageModeling.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = torch.load(folder + "/inputs.pt")
    with torch.no_grad():
        out = model(inputs["pixel_values"], bool_masked_pos=inputs["mask"])
    torch.save({"loss": out.loss, "reconstruction": out.reconstruction}, folder + "/outputs.pt")
    """
)


def test_auto_classes_resolve_after_import(tmp_path):
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", mask_patch_size=16))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_simmim.SimMIMConfig",
        "AutoModelForMaskedImageModeling": "modeling_simmim.SimMIMForMaskedImageModeling",
    }
    for code_file in ("configuration_simmim.py", "modeling_simmim.py", "backbones.py"):
        assert (tmp_path / code_file).exists(), code_file
    loaded = AutoModelForMaskedImageModeling.from_pretrained(tmp_path)
    assert isinstance(loaded, SimMIMForMaskedImageModeling)


def test_loads_with_trust_remote_code_without_the_package(tmp_path):
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("beit_test", mask_patch_size=16)).eval()
    model.save_pretrained(tmp_path)
    pixel_values = torch.randn(2, 3, 64, 64)
    mask = SimMIMMaskGenerator(64, 16, 8, 0.6)(2)
    torch.save({"pixel_values": pixel_values, "mask": mask}, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(HIDDEN_PACKAGE_LOADER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        expected = model(pixel_values, bool_masked_pos=mask)
    assert torch.allclose(outputs["reconstruction"], expected.reconstruction, atol=1e-6)
    assert torch.allclose(outputs["loss"], expected.loss, atol=1e-6)


def test_push_to_hub_uploads_the_same_folder(tmp_path, monkeypatch):
    """push_to_hub goes through save_pretrained: the uploaded folder carries the code files and auto_map."""
    import transformers.utils.hub as hub

    uploaded = {}

    def fake_upload(self, working_dir, repo_id, *args, **kwargs):
        uploaded["files"] = sorted(os.listdir(working_dir))
        uploaded["config"] = json.loads(open(os.path.join(working_dir, "config.json")).read())
        uploaded["repo_id"] = repo_id

    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", fake_upload)
    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": repo_id})()

    if hasattr(hub, "hf_api"):  # transformers >= 5.10
        monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    else:
        monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kwargs: FakeApi().create_repo(repo_id))
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", mask_patch_size=16))
    model.push_to_hub("user/simmim-test")
    assert uploaded["repo_id"] == "user/simmim-test"
    assert {"config.json", "model.safetensors", "modeling_simmim.py", "configuration_simmim.py"} <= set(uploaded["files"])
    assert "auto_map" in uploaded["config"]
