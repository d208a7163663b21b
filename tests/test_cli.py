import os

from PIL import Image

from msd_fast.cli import main
from msd_fast.encryption_demo import run


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
