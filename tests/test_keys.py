import json
import os
import pickle
import stat

import pytest
import torch

from msd_fast import Key

SECRET = "correct horse battery staple 7f3a"


def test_from_secret_is_deterministic_and_secret_dependent():
    a, b, c = Key.from_secret(SECRET), Key.from_secret(SECRET.encode()), Key.from_secret(SECRET + "!")
    assert a == b and a != c
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert torch.equal(a.block_permutation(196), b.block_permutation(196))
    assert not torch.equal(a.block_permutation(196), c.block_permutation(196))


def test_permutations_are_pinned_across_versions():
    # Derivation is hashlib + numpy only; these values are the contract that one secret gives the same
    # permutations on every machine, backend and torch version (changing them breaks every stored shard).
    key = Key.from_secret(b"msd_fast test vector")
    assert key.fingerprint == "b4ab3970c18cdfc8"
    assert key.block_permutation(8).tolist() == [3, 5, 6, 7, 0, 2, 1, 4]
    assert key.pixel_permutation(6).tolist() == [2, 4, 0, 3, 1, 5]
    assert key.negpos_mask(8).int().tolist() == [0, 0, 1, 1, 1, 0, 1, 1]
    assert key.token_permutations(5, [0, 7]).tolist() == [[4, 1, 3, 0, 2], [0, 1, 3, 2, 4]]


def test_uniform_stream_is_pinned_in_range_and_purpose_bound():
    key = Key.from_secret(b"pinned uniform")
    assert key.uniform("w", 4, 7).tolist() == [0.36732046614972846, -0.9960896826731453, 0.37611409269062235,
                                               0.231118072934265]
    values = key.uniform("w", 20000)
    assert values.dtype == torch.float64 and float(values.min()) >= -1.0 and float(values.max()) < 1.0
    assert abs(float(values.mean())) < 0.02 and abs(float(values.std()) - 3 ** -0.5) < 0.01
    assert not torch.equal(values[:8], key.uniform("v", 20000)[:8])
    assert not torch.equal(key.uniform("w", 4, 7), key.uniform("w", 4, 8))


def test_sub_keys_are_independent():
    key = Key.from_secret(SECRET)
    n = 64
    block, pixel = key.block_permutation(n), key.pixel_permutation(n)
    tokens = key.token_permutations(n, [0])[0]
    sample_blocks = key.sample_block_permutations(n, [0])[0]
    perms = [block, pixel, tokens, sample_blocks]
    for i in range(len(perms)):
        assert sorted(perms[i].tolist()) == list(range(n))
        for j in range(i):
            assert not torch.equal(perms[i], perms[j])
    rows = key.sample_block_permutations(n, [3, 4, 3])
    assert torch.equal(rows[0], rows[2]) and not torch.equal(rows[0], rows[1])
    mask = key.negpos_mask(4096)
    assert 0.45 < mask.float().mean().item() < 0.55


def test_generate_gives_distinct_keys():
    assert Key.generate() != Key.generate()


def test_secret_never_appears_in_repr_str_or_errors(tmp_path):
    key = Key.from_secret(SECRET)
    secret_hex = key._secret.hex()
    for text in (repr(key), str(key), f"{key}", key.fingerprint):
        assert secret_hex not in text and SECRET not in text
    assert repr(key) == f"Key(fingerprint='{key.fingerprint}')"
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(key)
    with pytest.raises(TypeError):
        Key(b"x" * 32)


def test_save_load_round_trip_permissions_and_no_overwrite(tmp_path):
    key = Key.generate()
    path = tmp_path / "consortium.key"
    key.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Key.load(path) == key
    with pytest.raises(FileExistsError):
        Key.generate().save(path)
    assert Key.load(path) == key  # untouched by the refused save
    other = Key.generate()
    other.save(path, overwrite=True)
    assert Key.load(path) == other
    assert [p.name for p in tmp_path.iterdir()] == ["consortium.key"]  # no temp files left behind


def test_load_rejects_corrupt_files_without_leaking(tmp_path):
    key = Key.generate()
    path = tmp_path / "k.key"
    key.save(path)
    text = path.read_text()
    secret_hex = key._secret.hex()
    tampered = tmp_path / "tampered.key"
    tampered.write_text(text.replace(secret_hex[:4], "0000" if secret_hex[:4] != "0000" else "1111"))
    os.chmod(tampered, 0o600)
    with pytest.raises(ValueError, match="fingerprint") as info:
        Key.load(tampered)
    assert secret_hex not in str(info.value)
    garbage = tmp_path / "garbage.key"
    garbage.write_text(text[: len(text) // 2])
    os.chmod(garbage, 0o600)
    with pytest.raises(ValueError, match="not an msd_fast key file") as info:
        Key.load(garbage)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def _traceback_locals(error: BaseException) -> str:
    """Every local variable of every frame of ``error``'s traceback below the test's own, as an error reporter
    records them."""
    text, tb = [], error.__traceback__.tb_next
    while tb is not None:
        text += [f"{name}={value!r}" for name, value in tb.tb_frame.f_locals.items()]
        tb = tb.tb_next
    return "\n".join(text)


@pytest.mark.parametrize("damage", ["fingerprint", "secret", "version"])
def test_a_refused_key_file_leaves_no_secret_in_the_traceback_locals(tmp_path, damage):
    key = Key.generate()
    path = tmp_path / "k.key"
    key.save(path)
    record = json.loads(path.read_text())
    secret_hex = record["secret"]
    if damage == "fingerprint":
        record["fingerprint"] = "0" * len(record["fingerprint"])
    elif damage == "secret":
        record["secret"] = secret_hex[:-2]
    else:
        record["version"] = 999
    path.write_text(json.dumps(record))
    os.chmod(path, 0o600)
    with pytest.raises(ValueError, match=str(path)) as info:
        Key.load(path)
    recorded = _traceback_locals(info.value)
    assert secret_hex[:-2] not in recorded and repr(bytes.fromhex(secret_hex))[2:40] not in recorded


def test_load_warns_on_world_readable_file(tmp_path):
    path = tmp_path / "k.key"
    Key.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.warns(UserWarning, match="readable by other users"):
        Key.load(path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="empty"):
        Key.from_secret(b"")
    with pytest.raises(TypeError, match="secret"):
        Key.from_secret(123)
    key = Key.generate()
    with pytest.raises(ValueError, match="n_blocks"):
        key.block_permutation(0)
    with pytest.raises(ValueError, match="sample_ids"):
        key.token_permutations(4, [-1])
