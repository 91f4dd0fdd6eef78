"""What a saved folder ships: nothing but the native config and weights where transformers has the class; the model
core (three files that need torch and transformers only) where it does not."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedImageModeling

import modeling_simmim
from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from modeling_simmim.modeling_simmim import SimMIMForImageClassification

PACKAGE = Path(modeling_simmim.__file__).parent
CORE = ("configuration_simmim.py", "modeling_simmim.py", "backbones.py")


def test_the_model_core_imports_nothing_else_from_the_package():
    """Relative imports (anywhere, also inside functions) stay within the three core files, whose other imports are
    the standard library, torch and transformers; so `save_pretrained` copies exactly these files."""
    allowed_roots = {"torch", "transformers", "__future__", *sys.stdlib_module_names}
    for name in CORE:
        tree = ast.parse((PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                assert f"{node.module}.py" in CORE, f"{name} imports .{node.module}"
            elif isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] in allowed_roots, f"{name} imports {node.module}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in allowed_roots, f"{name} imports {alias.name}"


def test_native_folders_ship_no_code(tmp_path):
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", mask_patch_size=16))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "swin" and config["architectures"] == ["SwinForMaskedImageModeling"]
    assert "auto_map" not in config and not list(tmp_path.glob("*.py"))
    assert type(AutoModelForMaskedImageModeling.from_pretrained(tmp_path)).__name__ == "SwinForMaskedImageModeling"


@pytest.mark.parametrize(
    "build, auto_class, remote_class",
    [
        # transformers has no pixel-regression BEiT MIM class
        (
            lambda: SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("beit_test", mask_patch_size=16)),
            "AutoModelForMaskedImageModeling",
            "SimMIMBeitForMaskedImageModeling",
        ),
        # Swin-L-like: a stage smaller than the window (transformers' Swin keeps the full window's bias table there)
        (
            lambda: SimMIMForMaskedImageModeling(
                SimMIMConfig.from_preset("swin_test", mask_patch_size=16, window_size=16)
            ),
            "AutoModelForMaskedImageModeling",
            "SimMIMForMaskedImageModeling",
        ),
        # a 3x3 decoder (transformers' MIM classes have the official 1x1 one)
        (
            lambda: SimMIMForMaskedImageModeling(
                SimMIMConfig.from_preset("swin_test", mask_patch_size=16, decoder_kernel_size=3)
            ),
            "AutoModelForMaskedImageModeling",
            "SimMIMForMaskedImageModeling",
        ),
        # a mean-pooled plain ViT classifier (transformers' ViTForImageClassification pools the CLS token)
        (
            lambda: SimMIMForImageClassification(SimMIMConfig.from_preset("vit_test", classifier_pooling="mean")),
            "AutoModelForImageClassification",
            "SimMIMForImageClassification",
        ),
    ],
)
def test_folders_without_a_transformers_class_ship_only_the_model_core(tmp_path, build, auto_class, remote_class):
    build().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {auto_class: f"modeling_simmim.{remote_class}"}
    assert sorted(path.name for path in tmp_path.glob("*.py")) == sorted(CORE)


REMOTE_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_simmim"] = None  # `import modeling_simmim` raises ImportError, installed or not
    import torch
    from transformers import AutoModelForMaskedImageModeling
    folder = sys.argv[1]
    try:
        AutoModelForMaskedImageModeling.from_pretrained(folder)
        refused = False
    except Exception:  # transformers asks for trust_remote_code (input() with no terminal, or an error)
        refused = True
    model = AutoModelForMaskedImageModeling.from_pretrained(folder, trust_remote_code=True).eval()
    inputs = torch.load(folder + "/inputs.pt")
    with torch.no_grad():
        out = model(inputs["pixel_values"], bool_masked_pos=inputs["mask"])
    torch.save({"loss": out.loss, "reconstruction": out.reconstruction}, folder + "/outputs.pt")
    # (SciPy and torchvision are imported by transformers itself here; the AST test covers the model files.)
    heavy = sorted(name for name in ("timm", "modeling_simmim.weight_transfer") if name in sys.modules)
    print(json.dumps({"refused": refused, "module": type(model).__module__, "class": type(model).__name__,
                      "heavy": heavy}))
    """
)


def test_remote_code_runs_with_torch_and_transformers_alone(tmp_path):
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("beit_test", mask_patch_size=16)).eval()
    model.save_pretrained(tmp_path)
    pixel_values = torch.randn(2, 3, 64, 64)
    mask = SimMIMMaskGenerator(64, 16, 8, 0.6)(2)
    torch.save({"pixel_values": pixel_values, "mask": mask}, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRUST_REMOTE_CODE_TIMEOUT="0")
    result = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_LOADER, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    report = json.loads(last[last.index("{") :])  # after transformers' trust_remote_code prompt
    assert report["refused"]  # never silently another model: BEiT has no native MIM class to fall back to
    assert (
        report["module"].startswith("transformers_modules") and report["class"] == "SimMIMBeitForMaskedImageModeling"
    )
    assert report["heavy"] == []  # no timm, no weight transfer (SciPy) behind the model code
    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        expected = model(pixel_values, bool_masked_pos=mask)
    assert torch.allclose(outputs["reconstruction"], expected.reconstruction, atol=1e-6)
    assert torch.allclose(outputs["loss"], expected.loss, atol=1e-6)


def test_push_to_hub_uploads_the_same_folder(tmp_path, monkeypatch):
    """push_to_hub goes through save_pretrained: the uploaded folder is the native one, with the core files only
    where the model needs them."""
    import transformers.utils.hub as hub

    uploads = []

    def fake_upload(self, working_dir, repo_id, *args, **kwargs):
        uploads.append(
            (sorted(os.listdir(working_dir)), json.loads(open(os.path.join(working_dir, "config.json")).read()))
        )

    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", fake_upload)

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": repo_id})()

    if hasattr(hub, "hf_api"):  # transformers >= 5.10
        monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    else:
        monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kwargs: FakeApi().create_repo(repo_id))
    SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", mask_patch_size=16)).push_to_hub("u/swin")
    SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("beit_test", mask_patch_size=16)).push_to_hub("u/beit")
    (swin_files, swin_config), (beit_files, beit_config) = uploads
    assert {"config.json", "model.safetensors"} <= set(swin_files) and not any(f.endswith(".py") for f in swin_files)
    assert swin_config["model_type"] == "swin" and "auto_map" not in swin_config
    assert set(CORE) <= set(beit_files) and "loading.py" not in beit_files and "cpu_bf16.py" not in beit_files
    assert "AutoModelForMaskedImageModeling" in beit_config["auto_map"]
