import os

import pytest
from PIL import Image

from msd_fast.cli.commands import main
from msd_fast.evaluation.encryption_demo import run


def test_encrypt_demo_writes_the_side_by_side_image(tmp_path, capsys):
    result = run(out_dir=str(tmp_path), patch_size=8, size=64)
    assert result["exact"] and result["wrong_key_changed"] > 0.3 and result["model_gap"] < 1e-4
    with Image.open(result["image"]) as image:
        assert image.size[0] > 4 * 64 and image.size[1] > 2 * 64
    out = capsys.readouterr().out
    assert result["fingerprint"] in out and "exact round trip: True" in out
    assert os.listdir(tmp_path) == ["encryption_demo.png"]


def test_cli_backends_and_demo_with_a_key_file(tmp_path, capsys):
    from msd_fast import Key

    key_path = tmp_path / "consortium.key"
    key = Key.generate()
    key.save(key_path)
    assert main(["backends"]) == 0
    assert "cpu: available" in capsys.readouterr().out
    assert main(["encrypt-demo", "--out", str(tmp_path / "demo"), "--size", "32", "--patch-size", "8",
                 "--key", str(key_path)]) == 0
    out = capsys.readouterr().out
    assert key.fingerprint in out and key._secret.hex() not in out


# ---- one error mechanism: a user error is one line on stderr and exit status 2, the traceback only with --debug ----
def _user_error_cases(folder):
    not_a_shard = folder / "notes.txt"
    not_a_shard.write_text("not a shard, not a checkpoint\n")
    return {
        "pretrain on a missing shard": (["pretrain", str(folder / "missing.shard"), "--out", str(folder / "p")],
                                        "missing.shard"),
        "pretrain on a file that is not a shard": (["pretrain", str(not_a_shard), "--out", str(folder / "p")],
                                                   "not an msd_fast shard"),
        "export of a file that is not a checkpoint": (["export", "--checkpoint", str(not_a_shard), "--out",
                                                       str(folder / "model.safetensors")], "checkpoint"),
        "demo --clients 0": (["demo", "--clients", "0", "--out", str(folder / "d")], "clients"),
        "demo --data on a missing folder": (["demo", "--data", str(folder / "no_such_folder"), "--out",
                                             str(folder / "d")], "no_such_folder"),
        "demo --label-fractions 1.5": (["demo", "--label-fractions", "1.5", "--out", str(folder / "d")],
                                       "label-fractions"),
    }


def test_user_errors_are_one_line_and_exit_status_2(tmp_path, capsys):
    for case, (argv, named) in _user_error_cases(tmp_path).items():
        assert main(argv + ["--no-progress"] if argv[0] == "demo" else argv) == 2, case
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"msd-fast {argv[0]}: error: "), (case, err)
        assert named in err and "Traceback" not in err, (case, err)
    # Nothing was written by the failing commands: no key, shard, checkpoint or model.
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["notes.txt"], written


def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path):
    from msd_fast.data import DataError

    argv, _ = _user_error_cases(tmp_path)["demo --label-fractions 1.5"]
    with pytest.raises(ValueError, match="label-fractions"):
        main(["--debug"] + argv)
    argv, _ = _user_error_cases(tmp_path)["demo --data on a missing folder"]
    with pytest.raises(DataError, match="no_such_folder"):
        main(argv + ["--no-progress", "--debug"])


def test_keyboard_interrupt_is_one_line_and_exit_status_130(monkeypatch, capsys):
    from msd_fast.cli import commands as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_backends", interrupted)
    assert main(["backends"]) == 130
    assert capsys.readouterr().err == "msd-fast backends: interrupted\n"


def test_a_bug_is_not_reported_as_a_user_error(monkeypatch, capsys):
    from msd_fast.cli import commands as cli

    def broken(args):
        raise TypeError("a bug, not a user error")

    monkeypatch.setattr(cli, "_backends", broken)
    assert main(["backends"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and "TypeError: a bug, not a user error" in err
    assert err[-1].startswith("msd-fast backends: internal error (a bug in msd_fast, not in your input")
    with pytest.raises(TypeError):
        main(["--debug", "backends"])
