"""Bad inputs are refused up front (issue 16): on the command line as one line ``msd-fast <command>: error: ...``
naming the flag, with exit status 2, before any work and before anything is written; in the Python API as a
ValueError naming the argument."""
import math
import os

import pytest
import torch

from msd_fast import Key, encrypt_patches, encrypt_vit
from msd_fast.cli import main
from msd_fast.client import decrypt_shard, encode_dataset
from msd_fast.data import synthetic_dataset
from msd_fast.pretrain import PretrainConfig
from msd_fast.pretrain.checkpoint import load_checkpoint

KEY = Key.from_secret(b"bad inputs test key")
TINY_VIT = ["--depth", "1", "--embed-dim", "24", "--num-heads", "2", "--out-dim", "16", "--head-hidden-dim", "32",
            "--head-bottleneck-dim", "16", "--local-views", "1", "--batch-size", "8", "--device", "cpu",
            "--no-progress"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A key file and a tiny image-mode shard (16 synthetic 32x32 scans, patch 8), also spelt another way."""
    folder = tmp_path_factory.mktemp("inputs")
    KEY.save(folder / "consortium.key")
    shard = str(folder / "client.shard")
    encode_dataset(synthetic_dataset(16, size=32), KEY, shard, patch_size=8, progress=False)
    same_shard = os.path.join(str(folder), ".", "client.shard")  # pathlib would drop the "."
    return {"key": str(folder / "consortium.key"), "shard": shard, "same_shard": same_shard}


PRETRAIN = ["pretrain", "{shard}", "--out", "{out}", "--batch-size", "8", "--no-progress"]
CLI_CASES = [
    (PRETRAIN + ["--lr", "-1"], "--lr must be a positive finite number, got -1.0"),
    (PRETRAIN + ["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (PRETRAIN + ["--min-lr=-1e-6"], "--min-lr must be a finite number >= 0"),
    (PRETRAIN + ["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    (PRETRAIN + ["--weight-decay-end", "inf"], "--weight-decay-end must be a finite number >= 0"),
    (PRETRAIN + ["--momentum-teacher", "1.5"], "--momentum-teacher must be in [0, 1]"),
    (PRETRAIN + ["--momentum-teacher", "-0.1"], "--momentum-teacher must be in [0, 1]"),
    (PRETRAIN + ["--depth", "0"], "--depth must be >= 1"),
    (PRETRAIN + ["--embed-dim", "-8"], "--embed-dim must be >= 1"),
    (PRETRAIN + ["--num-heads", "0"], "--num-heads must be >= 1"),
    (PRETRAIN + ["--embed-dim", "50", "--num-heads", "3"], "--embed-dim 50 must be divisible by --num-heads 3"),
    (PRETRAIN + ["--embed-dim", "50"], "--embed-dim 50: dim should be divisible by num_heads"),  # the arch's 3 heads
    (PRETRAIN + ["--drop-path", "1"], "--drop-path must be in [0, 1)"),
    (PRETRAIN + ["--clip-grad", "-1"], "--clip-grad must be a finite number >= 0"),
    (PRETRAIN + ["--teacher-temp", "0"], "--teacher-temp must be a positive finite number"),
    (PRETRAIN + ["--warmup-teacher-temp", "-0.04"], "--warmup-teacher-temp must be a positive finite number"),
    (PRETRAIN + ["--student-temp", "0"], "--student-temp must be a positive finite number"),
    (PRETRAIN + ["--center-momentum", "1.1"], "--center-momentum must be in [0, 1]"),
    (PRETRAIN + ["--freeze-last-layer", "-1"], "--freeze-last-layer must be >= 0"),
    (PRETRAIN + ["--warmup-teacher-temp-epochs", "-1"], "--warmup-teacher-temp-epochs must be in [0, --epochs 30]"),
    (PRETRAIN + ["--warmup-epochs", "5", "--epochs", "2"], "--warmup-epochs must be in [0, --epochs 2], got 5"),
    (["pretrain", "{shard}", "{same_shard}", "--out", "{out}"], "are the same file; give each shard once"),
    (["encrypt-demo", "--out", "{out}", "--patch-size", "0"], "--patch-size must be a positive integer, got 0"),
    (["encrypt-demo", "--out", "{out}", "--size=-16"], "--size must be a positive integer, got -16"),
    (["encrypt-demo", "--out", "{out}", "--size", "30", "--patch-size", "8"], "--patch-size 8 must divide --size 30"),
    (["encrypt-demo", "--out", "{out}", "--size", "100000"], "--size must be at most 8192"),
    (["encode", "--key", "{key}", "--data", "synthetic:4", "--out", "{out}", "--image-size", "100000"],
     "--image-size must be at most 8192 pixels per side"),
    (["encode", "--key", "{key}", "--data", "synthetic:4", "--out", "{out}", "--image-size", "32x0"],
     "--image-size must be a positive int"),
    (["audit", "--quick", "--out", "{out}", "--images", "-5"], "--images must be a positive integer, got -5"),
    (["audit", "--quick", "--out", "{out}", "--images", "0"], "--images must be a positive integer, got 0"),
    (["audit", "--quick", "--out", "{out}", "--patch-size", "0"], "--patch-size must be a positive integer, got 0"),
    (["probe", "--data", "synthetic:16", "--device", "cpu", "--out", "{out}", "--k", "0"], "--k must be >= 1, got 0"),
    (["probe", "--data", "synthetic:16", "--device", "cpu", "--out", "{out}", "--image-size", "9000"],
     "--image-size must be at most 8192"),
    (["finetune", "--data", "synthetic:16", "--device", "cpu", "--out", "{out}", "--lr", "nan"], "--lr must be"),
]


@pytest.mark.parametrize("argv, message", CLI_CASES, ids=[" ".join(argv) for argv, _ in CLI_CASES])
def test_bad_cli_input_is_one_line_exit_status_2_and_writes_nothing(argv, message, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [arg.format(out=out, **inputs) for arg in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"msd-fast {argv[0]}: error: "), captured.err
    assert message in captured.err and "Traceback" not in captured.err, captured.err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_pretrain_for_one_epoch_uses_the_adaptive_warm_up_and_resumes(inputs, tmp_path, capsys):
    argv = ["pretrain", inputs["shard"], "--out", str(tmp_path / "run"), "--epochs", "1"] + TINY_VIT
    assert main(argv) == 0
    assert "pretrained 1 epochs" in capsys.readouterr().out
    checkpoint = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert checkpoint["epoch"] == 1 and checkpoint["config"]["warmup_epochs"] == 1
    assert main(argv + ["--resume"]) == 0  # the resolved default compares equal to the saved one


def test_default_warm_up_is_min_of_3_and_epochs_but_an_explicit_one_is_checked(inputs):
    assert [PretrainConfig(shards=[inputs["shard"]], epochs=e).warmup_epochs for e in (1, 2, 3, 30)] == [1, 2, 3, 3]
    assert PretrainConfig(shards=[inputs["shard"]], epochs=2, warmup_epochs=0).warmup_epochs == 0
    with pytest.raises(ValueError, match=r"--warmup-epochs must be in \[0, --epochs 2\], got 5"):
        PretrainConfig(shards=[inputs["shard"]], epochs=2, warmup_epochs=5)


@pytest.mark.parametrize("max_value", [math.inf, -math.inf, math.nan, 0, -1.0, True])
def test_max_value_must_be_a_positive_finite_number(max_value):
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="max_value must be a positive finite number"):
        encrypt_patches(x, KEY, 4, negpos=True, max_value=max_value)
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=8, depth=1, num_heads=2, num_classes=0)
    with pytest.raises(ValueError, match="max_value must be a positive finite number"):
        encrypt_vit(model, KEY, negpos=True, max_value=max_value)


@pytest.mark.parametrize("indices", [[0.5], 0.0, torch.tensor([1.0]), [True, False], torch.tensor([True])],
                         ids=["float list", "float", "float tensor", "bool list", "bool tensor"])
def test_decrypt_shard_refuses_non_integer_indices(indices, inputs):
    with pytest.raises(ValueError, match="indices must be integers"):
        decrypt_shard(inputs["shard"], KEY, indices)


def test_decrypt_shard_accepts_integer_indices(inputs):
    everything = decrypt_shard(inputs["shard"], KEY)
    assert torch.equal(decrypt_shard(inputs["shard"], KEY, [3, 7]), everything[[3, 7]])
    assert torch.equal(decrypt_shard(inputs["shard"], KEY, torch.tensor([5], dtype=torch.int32)), everything[[5]])
    assert decrypt_shard(inputs["shard"], KEY, []).shape[0] == 0
