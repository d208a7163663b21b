"""Bad inputs are refused up front (issue 16): on the command line as one line ``msd-fast <command>: error: ...``
naming the flag, with exit status 2, before any work and before anything is written; in the Python API as a
ValueError naming the argument."""
import math
import os

import pytest
import torch

from msd_fast import Key, encrypt_patches, encrypt_vit
from msd_fast.cli.commands import main
from msd_fast.client.encode import decrypt_shard, encode_dataset
from msd_fast.data import synthetic_dataset
from msd_fast.server import PretrainConfig
from msd_fast.server.checkpoint import load_checkpoint

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
    other_key = Key.from_secret(b"another consortium")
    other_key.save(folder / "other.key")
    foreign = str(folder / "foreign.shard")  # the same images under another key
    encode_dataset(synthetic_dataset(16, size=32), other_key, foreign, patch_size=8, progress=False)
    patch16 = str(folder / "patch16.shard")
    encode_dataset(synthetic_dataset(16, size=32), KEY, patch16, patch_size=16, progress=False)
    raw = open(shard, "rb").read()
    (folder / "truncated.shard").write_bytes(raw[:len(raw) // 2])
    flipped = bytearray(raw)
    flipped[-40] ^= 0xFF
    (folder / "flipped.shard").write_bytes(bytes(flipped))
    (folder / "notes.txt").write_text("not a key, a shard, a checkpoint or a model\n")
    (folder / "empty").mkdir()
    return {"key": str(folder / "consortium.key"), "shard": shard, "same_shard": same_shard, "foreign": foreign,
            "patch16": patch16, "truncated": str(folder / "truncated.shard"),
            "flipped": str(folder / "flipped.shard"), "notes": str(folder / "notes.txt"),
            "empty": str(folder / "empty"), "missing": str(folder / "no_such_file")}


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
    # files that are missing, foreign, damaged or do not belong together
    (["pretrain", "{missing}", "--out", "{out}"], "No such file or directory"),
    (["pretrain", "{notes}", "--out", "{out}"], "is not an msd_fast shard"),
    (PRETRAIN[:1] + ["{truncated}"] + PRETRAIN[2:], "file is truncated"),
    (PRETRAIN[:1] + ["{flipped}"] + PRETRAIN[2:], "checksum mismatch"),
    (PRETRAIN[:2] + ["{foreign}"] + PRETRAIN[2:], "encoded with a different key"),
    (PRETRAIN[:2] + ["{patch16}"] + PRETRAIN[2:], "patch_size differ"),
    (PRETRAIN + ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (PRETRAIN + ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (PRETRAIN + ["--global-keep", "0"], "--global-keep must be in (0, 1]"),
    (PRETRAIN + ["--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["export", "--checkpoint", "{notes}", "--out", "{out}"], "is not a readable msd_fast checkpoint"),
    (["export", "--checkpoint", "{missing}", "--out", "{out}"], "No such file or directory"),
    (["keygen", "--out", "{out}", "--secret-file", "{missing}"], "No such file or directory"),
    (["encode", "--key", "{missing}", "--data", "synthetic:4", "--out", "{out}"], "No such file or directory"),
    (["encode", "--key", "{notes}", "--data", "synthetic:4", "--out", "{out}"], "not an msd_fast key file"),
    (["encode", "--key", "{key}", "--data", "{empty}", "--out", "{out}"], "no images found"),
    (["encode", "--key", "{key}", "--data", "{missing}", "--out", "{out}"], "no such file or folder"),
    (["encode", "--key", "{key}", "--data", "synthetic:0", "--out", "{out}"], "N a positive integer"),
    (["encode", "--key", "{key}", "--data", "synthetic:4", "--patch-size", "7", "--out", "{out}"],
     "patch size 7 does not divide the image size 32x32"),
    (["encode", "--key", "{key}", "--data", "synthetic:4", "--batch-size", "0", "--out", "{out}"],
     "--batch-size must be a positive int, got 0"),
    (["encode", "--key", "{key}", "--data", "synthetic:8", "--clients", "2", "--client-index", "5", "--out", "{out}"],
     "--client-index must be in [0, 2), got 5"),
    (["encode", "--key", "{key}", "--data", "synthetic:4", "--device", "cuda:7", "--out", "{out}"], "--device cuda:7"),
    (["finetune", "--model", "{notes}", "--key", "{key}", "--data", "synthetic:16", "--out", "{out}"],
     "is not a safetensors file"),
    (["probe", "--model", "{missing}", "--key", "{key}", "--data", "synthetic:16", "--out", "{out}"],
     "No such file or directory"),
    (["fedavg", "--data", "synthetic:16", "--clients", "0", "--patch-size", "8", "--out", "{out}"],
     "--clients must be a positive integer, got 0"),
    (["fedavg", "--data", "synthetic:16", "--clients", "2", "--rounds", "0", "--patch-size", "8", "--out", "{out}"],
     "--rounds must be a positive int, got 0"),
    (["fedavg", "--data", "synthetic:16", "--clients", "50", "--patch-size", "8", "--out", "{out}"],
     "cannot give 50 clients at least one image each"),
    # the demo checks every composed setting and the data size before it writes anything
    (["demo", "--out", "{out}", "--clients", "0"], "--clients must be a positive integer, got 0"),
    (["demo", "--out", "{out}", "--data", "synthetic:5"], "fewer than one --pretrain-batch-size"),
    (["demo", "--out", "{out}", "--image-size", "0"], "--image-size must be a positive int"),
    (["demo", "--out", "{out}", "--embed-dim", "50", "--num-heads", "3"], "--embed-dim 50 must be divisible"),
    (["demo", "--out", "{out}", "--contrast", "2"], "--contrast must be in [0, 1)"),
    (["demo", "--out", "{out}", "--label-fractions", "0"], "--label-fractions must be numbers in (0, 1]"),
    (["demo", "--out", "{out}", "--device", "cuda:9"], "--device cuda:9"),
    (["encrypt-demo", "--out", "{out}", "--key", "{notes}"], "not an msd_fast key file"),
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


OUT_CASES = [["pretrain", "{shard}", "--out", "{out}"], ["demo", "--out", "{out}"], ["audit", "--quick", "--out", "{out}"],
             ["encrypt-demo", "--out", "{out}"],
             ["finetune", "--data", "synthetic:16", "--patch-size", "8", "--init", "random", "--out", "{out}"]]


@pytest.mark.parametrize("argv", OUT_CASES, ids=[a[0] for a in OUT_CASES])
def test_an_out_folder_that_is_a_file_is_refused_before_any_work(argv, inputs, tmp_path, capsys):
    blocker = tmp_path / "out"
    blocker.write_text("keep")
    assert main([arg.format(out=blocker, **inputs) for arg in argv]) == 2
    assert capsys.readouterr().err == f"msd-fast {argv[0]}: error: --out {blocker} is a file, not a folder\n"
    assert blocker.read_text() == "keep" and list(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize("argv", [["keygen", "--out", "{out}"], ["export", "--checkpoint", "{notes}", "--out", "{out}"],
                                  ["encode", "--key", "{key}", "--data", "synthetic:4", "--out", "{out}"]],
                         ids=["keygen", "export", "encode"])
def test_an_out_file_that_is_a_folder_or_exists_is_refused_before_any_work(argv, inputs, tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    assert main([arg.format(out=folder, **inputs) for arg in argv]) == 2
    assert capsys.readouterr().err == f"msd-fast {argv[0]}: error: --out {folder} is a folder, not a file\n"
    existing = tmp_path / "existing"
    existing.write_text("keep")
    assert main([arg.format(out=existing, **inputs) for arg in argv]) == 2
    assert "exists; refusing to replace it (--force on the command line" in capsys.readouterr().err
    assert existing.read_text() == "keep"


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "x.shard", "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["demo", "--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    (["encode", "--data", "synthetic"], "the following arguments are required: --key, --out"),
    (["no-such-command"], "argument command: invalid choice: 'no-such-command'"),
], ids=["bad choice", "bad type", "missing flags", "unknown command"])
def test_argparse_refusals_are_one_line_too(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "usage:" not in err, err


def test_a_world_readable_file_that_is_not_a_key_gets_only_the_error(inputs, tmp_path, capsys):
    os.chmod(inputs["notes"], 0o644)
    argv = ["encode", "--key", inputs["notes"], "--data", "synthetic:4", "--out", str(tmp_path / "x.shard")]
    assert main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1  # no permission warning about a file that is not a key


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
    assert torch.equal(decrypt_shard(inputs["shard"], KEY, 3), everything[3])  # one int: one item
    with pytest.raises(IndexError, match="out of range for 16 items"):
        decrypt_shard(inputs["shard"], KEY, [16])
