"""The timm hub-folder export (msd_fast.client.timm_export): a process that cannot import msd_fast loads the folder
with ``timm.create_model("local-dir:...")`` and gets the weights msd_fast decrypted and the same features on plain
images (through timm's own preprocessing), for image mode (key-wide and per-image block orders) and token mode;
the folder is written atomically, refuses to replace, and holds no key."""
import json
import os
import subprocess
import sys

import pytest
import torch

from msd_fast import Key
from msd_fast.cli.commands import main
from msd_fast.client import pretrained_classifier
from msd_fast.client.timm_export import CONFIG_NAME, WEIGHTS_NAME, export_timm, plain_vit
from msd_fast.data import synthetic_dataset

N_CLASSES = 5

# Runs in `python -I` (no PYTHONPATH, no cwd on the path) with msd_fast blocked on sys.meta_path: only timm, torch,
# PIL. Loads the folder, preprocesses the plain images with timm's data config and transform, and reports what the
# parent compares with msd_fast.
TIMM_ONLY = r'''
import importlib.abc, json, sys

class BlockMsdFast(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "msd_fast" or name.startswith("msd_fast."):
            raise ImportError("msd_fast is blocked in this process")

sys.meta_path.insert(0, BlockMsdFast())
try:
    import msd_fast  # noqa: F401
    sys.exit("msd_fast is importable: the test would not prove anything")
except ImportError:
    pass
import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

folder, expected_path, n_classes = sys.argv[1], sys.argv[2], int(sys.argv[3])
expected = torch.load(expected_path)
model = timm.create_model("local-dir:" + folder, pretrained=True, num_classes=n_classes).eval()
backbone = timm.create_model("local-dir:" + folder, pretrained=True).eval()
config = resolve_data_config({}, model=model)
transform = create_transform(**config)
images = expected["images"]
pil = [Image.fromarray(image.permute(1, 2, 0).squeeze(-1).numpy()) for image in images]
x = torch.stack([transform(p) for p in pil])
with torch.no_grad():
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    logits = model(x)
    backbone_out = backbone(x)
weights = {k: float((v - expected["weights"][k]).abs().max()) for k, v in model.state_dict().items()
           if not k.startswith("head.")}
print(json.dumps({"feature_diff": float((features - expected["features"]).abs().max()),
                  "feature_scale": float(expected["features"].abs().max()),
                  "backbone_diff": float((backbone_out - expected["features"]).abs().max()),
                  "weights": weights, "missing": sorted(set(expected["weights"]) - set(weights)),
                  "logits_shape": list(logits.shape), "backbone_num_classes": backbone.num_classes,
                  "input_size": list(config["input_size"]), "msd_fast_loaded": "msd_fast" in sys.modules}))
'''


@pytest.fixture(scope="module")
def key(exported_backbones):
    return Key.from_secret(exported_backbones["secret"])


@pytest.fixture(scope="module")
def per_sample_export(tmp_path_factory, key):
    """The default encryption (dense, a block order per image), pretrained one epoch and exported."""
    from msd_fast.client.encode import encode_dataset
    from msd_fast.server import PretrainConfig, export_backbone, pretrain

    folder = tmp_path_factory.mktemp("per_sample")
    encode_dataset(synthetic_dataset(32, size=32), key, str(folder / "s.shard"), patch_size=8, sample_id_start=0,
                   progress=False)
    pretrain(PretrainConfig(shards=[str(folder / "s.shard")], out=str(folder / "run"), depth=1, embed_dim=24,
                            num_heads=2, drop_path=0.0, out_dim=32, head_hidden_dim=32, head_bottleneck_dim=16,
                            local_views=1, epochs=1, batch_size=16, warmup_epochs=0, progress=False))
    export_backbone(str(folder / "run" / "checkpoint.pt"), str(folder / "model.safetensors"))
    return str(folder / "model.safetensors")


def _export_path(name, exported_backbones, per_sample_export):
    return per_sample_export if name == "per_sample" else exported_backbones[name]


@pytest.mark.parametrize("name", ["image", "per_sample", "token"])
def test_timm_alone_loads_the_folder_with_msd_fasts_weights_and_features(name, exported_backbones,
                                                                        per_sample_export, key, tmp_path):
    path = _export_path(name, exported_backbones, per_sample_export)
    images = synthetic_dataset(6, size=32, split="test").to_tensor()
    mean, std = 97.0, 41.0  # the client's own standardisation (pixel units)
    export_timm(path, key, str(tmp_path / "hub"), mean=mean, std=std)
    classifier = pretrained_classifier(path, key, N_CLASSES, mean=mean, std=std).eval()
    with torch.no_grad():
        features = classifier.features(images)
    vit = plain_vit(path, key, mean=mean, std=std)[0]
    torch.save({"images": images, "features": features, "weights": vit.state_dict()}, tmp_path / "expected.pt")
    script = tmp_path / "timm_only.py"
    script.write_text(TIMM_ONLY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-I", str(script), str(tmp_path / "hub"), str(tmp_path / "expected.pt"),
                          str(N_CLASSES)], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert not report["msd_fast_loaded"]
    assert report["missing"] == []
    assert max(report["weights"].values()) == 0.0  # bit-identical weights
    assert report["feature_diff"] <= 1e-4 * max(1.0, report["feature_scale"]), report
    assert report["backbone_diff"] <= 1e-4 * max(1.0, report["feature_scale"]), report
    assert report["logits_shape"] == [6, N_CLASSES]
    assert report["backbone_num_classes"] == 0  # a plain load is the backbone
    assert report["input_size"] == [1, 32, 32]


def test_config_records_the_architecture_and_timms_normalisation(exported_backbones, key, tmp_path):
    config = export_timm(exported_backbones["image"], key, str(tmp_path / "hub"), mean=97.0, std=41.0)
    on_disk = json.loads((tmp_path / "hub" / CONFIG_NAME).read_text())
    assert on_disk == json.loads(json.dumps(config))
    assert sorted(os.listdir(tmp_path / "hub")) == [CONFIG_NAME, WEIGHTS_NAME]
    args = on_disk["model_args"]
    assert on_disk["architecture"] == "vit_tiny_patch16_224"
    assert (args["depth"], args["embed_dim"], args["num_heads"], args["patch_size"], args["in_chans"]) == \
        (1, 24, 2, 8, 1)
    assert args["img_size"] == [32, 32] and args["class_token"] and args["reg_tokens"] == 0
    assert args["global_pool"] == "token" and args["num_classes"] == 0
    cfg = on_disk["pretrained_cfg"]
    assert cfg["input_size"] == [1, 32, 32]
    assert cfg["mean"] == pytest.approx([97.0 / 255]) and cfg["std"] == pytest.approx([41.0 / 255])
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] and cfg["first_conv"] == "patch_embed.proj"
    assert on_disk["num_features"] == 24
    token = export_timm(exported_backbones["token"], key, str(tmp_path / "token"))
    assert token["model_args"]["no_embed_class"] is True and token["model_args"]["pos_embed"] == "learn"
    assert token["pretrained_cfg"]["mean"] == [0.5] and token["pretrained_cfg"]["std"] == [0.25]


def test_the_folder_holds_no_key(exported_backbones, key, tmp_path):
    export_timm(exported_backbones["image"], key, str(tmp_path / "hub"))
    secret = exported_backbones["secret"]
    for name in os.listdir(tmp_path / "hub"):
        data = (tmp_path / "hub" / name).read_bytes()
        assert secret not in data and secret.hex().encode() not in data


def test_wrong_key_existing_folder_and_bad_statistics_are_refused(exported_backbones, key, tmp_path):
    out = str(tmp_path / "hub")
    with pytest.raises(ValueError, match="not with this key"):
        export_timm(exported_backbones["image"], Key.from_secret(b"another consortium"), out)
    assert not os.path.exists(out)
    with pytest.raises(ValueError, match="std must be > 0"):
        export_timm(exported_backbones["image"], key, out, std=0.0)
    with pytest.raises(ValueError, match="one per channel"):
        export_timm(exported_backbones["image"], key, out, mean=[1.0, 2.0])
    export_timm(exported_backbones["image"], key, out, mean=100.0)
    with pytest.raises(FileExistsError, match="refusing to replace"):
        export_timm(exported_backbones["image"], key, out)
    export_timm(exported_backbones["image"], key, out, mean=50.0, overwrite=True)
    assert json.loads((tmp_path / "hub" / CONFIG_NAME).read_text())["pretrained_cfg"]["mean"] == \
        pytest.approx([50.0 / 255])
    assert sorted(os.listdir(tmp_path)) == ["hub"]  # no temporary folder left beside it


def test_a_failed_write_leaves_no_folder(exported_backbones, key, tmp_path, monkeypatch):
    import msd_fast.client.timm_export as timm_export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(timm_export, "safetensors_bytes", broken)
    with pytest.raises(OSError, match="disk full"):
        export_timm(exported_backbones["image"], key, str(tmp_path / "hub"))
    assert os.listdir(tmp_path) == []


def test_cli_export_timm(exported_backbones, tmp_path, capsys):
    key_path = tmp_path / "consortium.key"
    Key.from_secret(exported_backbones["secret"]).save(str(key_path))
    out = tmp_path / "hub"
    argv = ["export-timm", "--model", exported_backbones["image"], "--key", str(key_path), "--out", str(out),
            "--mean", "90", "--std", "40"]
    assert main(argv) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert json.loads((out / CONFIG_NAME).read_text())["pretrained_cfg"]["std"] == pytest.approx([40 / 255])
    assert main(argv) == 2  # exists
    assert "refusing to replace" in capsys.readouterr().err
    wrong = tmp_path / "wrong.key"
    Key.from_secret(b"another consortium").save(str(wrong))
    assert main(["export-timm", "--model", exported_backbones["image"], "--key", str(wrong), "--out",
                 str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msd-fast export-timm: error:") and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as bad_flag:
        main(["export-timm", "--model", exported_backbones["image"], "--key", str(key_path), "--out",
              str(tmp_path / "bad"), "--mean", "a,b"])
    assert bad_flag.value.code == 2 and "--mean" in capsys.readouterr().err
