"""Per-call host work the ops avoid without weakening a check: sample_views indices skip masked_gather's range
reduction (and its device sync) until they are modified; cached encryption tables are not copied again; backend
availability is computed once per interpreter setting."""
import pytest
import torch

import msd_fast
from msd_fast import Key, encrypt_patches, masked_gather, sample_views
from msd_fast.backends import resolve_backend
from msd_fast.ops import masked_gather as masked_gather_module
from msd_fast.ops.patch_encryption import key_tables


def _forbid_range_reduction(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the index range was reduced although sample_views made the indices")
    monkeypatch.setattr(masked_gather_module.torch, "aminmax", fail)


def test_sample_views_indices_skip_the_range_reduction(monkeypatch):
    tokens, pos = torch.randn(3, 10, 4), torch.randn(10, 4)
    idx = sample_views(3, 10, 2, 0.5)
    expected = masked_gather(tokens, idx.clone(), pos=pos, backend="reference")  # a clone is checked in full
    _forbid_range_reduction(monkeypatch)
    for backend in ("reference", "cpu"):
        assert torch.equal(masked_gather(tokens, idx, pos=pos, backend=backend), expected)
    with pytest.raises(AssertionError, match="was reduced"):
        masked_gather(tokens, idx.clone(), backend="cpu")


def test_modified_or_larger_indices_are_checked_again():
    tokens = torch.randn(2, 6, 4)
    idx = sample_views(2, 6, 1, 3)
    idx[0, 1, 2] = 6  # in place: bumps the version counter, so the recorded bound no longer holds
    with pytest.raises(IndexError, match="idx holds 6, outside \\[0, 6\\)"):
        masked_gather(tokens, idx, backend="cpu")
    view = sample_views(2, 6, 1, 3)
    view[0].fill_(9)  # through a view: the version counter is shared
    with pytest.raises(IndexError, match="idx holds 9"):
        masked_gather(tokens, view, backend="cpu")
    wider = sample_views(2, 9, 1, 9)  # drawn below 9 but used with N = 6 tokens
    with pytest.raises(IndexError, match="idx holds 8, outside \\[0, 6\\)"):
        masked_gather(tokens, wider, backend="reference")


def test_sample_views_and_masked_gather_compile_fullgraph():
    tokens = torch.randn(2, 8, 4)

    def views(tokens):
        idx = sample_views(2, 8, 3, 0.5)
        return masked_gather(tokens, idx), idx

    out, idx = torch.compile(views, fullgraph=True, backend="aot_eager")(tokens)
    assert torch.equal(out, masked_gather(tokens, idx, backend="reference"))


def test_cached_tables_are_not_copied_per_call():
    key = Key.from_secret(b"overhead")
    tables = key_tables(key, 4, 48, block_scramble=True, pixel_shuffle=True, negpos=True, sample_ids=None,
                        decrypt=False)
    assert tables.to(torch.device("cpu")) is tables
    meta = tables.to(torch.device("meta"))
    assert meta is not tables and all(t.device.type == "meta" for t in meta)
    x = torch.rand(2, 3, 8, 8)
    first = encrypt_patches(x, key, 4, negpos=True, backend="cpu")
    assert torch.equal(encrypt_patches(x, key, 4, negpos=True, backend="cpu"), first)


def test_backend_status_follows_the_interpreter_setting(monkeypatch):
    assert msd_fast.backends() == msd_fast.backends()
    if torch.cuda.is_available():
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert msd_fast.backends()["triton"].available
    assert resolve_backend("triton", torch.device("cpu"), "masked_gather") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not msd_fast.backends()["triton"].available
