"""The small shared pieces behind the trainer, the audit and the ops: view groups, seed domains, the audit's attack
table, the one wrong-key check, the kernel lookup and the image grid."""
import dataclasses
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from msd_fast import Key
from msd_fast.backends import BackendUnavailableError, backends, kernels_for
from msd_fast.evaluation.audit import report
from msd_fast.evaluation.image_grid import ciphertext_pixels, save_image_columns
from msd_fast.keys import check_key_matches
from msd_fast.ops.masked_gather import sample_views
from msd_fast.server import seeds
from msd_fast.server.config import PretrainConfig
from msd_fast.server.views import Views, draw_views

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_audit import smooth_images  # noqa: E402


def _config(tmp_path, **changes):
    options = dict(shards=[str(tmp_path / "x.shard")], out=str(tmp_path / "run"), global_views=2, global_keep=0.5,
                   local_views=3, local_keep=0.25, batch_size=8, seed=3)
    return PretrainConfig(**(options | changes))


def test_views_name_the_groups_and_split_the_global_batch_like_one_process(tmp_path):
    config = _config(tmp_path)
    whole = draw_views(config, 16, step=5, first=0, count=8, device=torch.device("cpu"))
    assert whole.global_views.shape == (2, 8, 8) and whole.local_views.shape == (3, 8, 4)
    assert [v.shape[0] for v in whole.all] == [2, 3]  # global first: the teacher's views lead the student's
    # the seed stream the views draw from, by hand: global then local from one generator
    generator = torch.Generator().manual_seed(seeds.derived_seed(config.seed, seeds.SEED_VIEWS, 5))
    assert torch.equal(whole.global_views, sample_views(8, 16, 2, 0.5, generator=generator))
    assert torch.equal(whole.local_views, sample_views(8, 16, 3, 0.25, generator=generator))
    # two processes with 4 items each draw exactly the slices of the one-process batch
    halves = [draw_views(config, 16, step=5, first=first, count=4, device=torch.device("cpu")) for first in (0, 4)]
    assert torch.equal(torch.cat([h.global_views for h in halves], 1), whole.global_views)
    assert torch.equal(torch.cat([h.local_views for h in halves], 1), whole.local_views)
    assert not torch.equal(draw_views(config, 16, 6, 0, 8, torch.device("cpu")).global_views, whole.global_views)
    no_local = draw_views(_config(tmp_path, local_views=0), 16, 5, 0, 8, torch.device("cpu"))
    assert no_local.local_views is None and len(no_local.all) == 1
    assert Views(whole.global_views).all[0] is whole.global_views


def test_seed_domains_are_distinct_and_give_distinct_streams():
    domains = [value for name, value in vars(seeds).items() if name.startswith("SEED_")]
    assert len(domains) == 4 and len(set(domains)) == 4
    assert len({seeds.derived_seed(0, domain, 7) for domain in domains}) == 4
    assert seeds.derived_seed(1, 2, 3) == seeds.derived_seed(1, 2, 3) < 2**63


def test_every_audit_section_is_filled_by_a_row_of_the_attack_table():
    fields = {f.name for f in dataclasses.fields(report.AuditReport)} - {"setup", "figure"}
    assert {attack.section for attack in report.ATTACKS} == fields
    assert len({attack.name for attack in report.ATTACKS}) == len(report.ATTACKS)
    assert all(callable(attack.applies_to) and callable(attack.run) for attack in report.ATTACKS)


def test_a_new_attack_is_one_function_and_one_table_row(monkeypatch):
    seen = []

    def extra(audit):
        seen.append((audit.blocks, audit.block_values, len(audit.heldout)))
        return [{"config": "extra", "psnr": 1.0}]

    only = (report.Attack("jigsaw reassembly", report._always, report.jigsaw_rows, "jigsaw"),
            report.Attack("extra attack", lambda audit: audit.shard is None, extra, "tokens"),
            report.Attack("never", lambda audit: False, lambda audit: 1 / 0, "dense"))
    monkeypatch.setattr(report, "ATTACKS", only)
    result = report.run_audit(smooth_images(8, size=16, seed=1), Key.from_secret(b"table"), patch_size=8,
                              known_pairs=(1,), max_heldout=4, figure_rows=1)
    assert seen == [(4, 64, 4)]
    assert result.tokens == [{"config": "extra", "psnr": 1.0}] and len(result.jigsaw) == len(report.JIGSAW_CONFIGS)
    assert result.dense == [] and result.known_plaintext == []
    assert set(result.setup["section_seconds"]) == {"jigsaw", "tokens"}


def test_one_wrong_key_check_names_both_fingerprints_and_no_secret():
    key, other = Key.from_secret(b"right"), Key.from_secret(b"other")
    assert check_key_matches(key, key.fingerprint, "x.shard was encoded") is key
    with pytest.raises(ValueError) as info:
        check_key_matches(other, key.fingerprint, "x.shard was encoded")
    message = str(info.value)
    assert message == (f"x.shard was encoded with key fingerprint {key.fingerprint}, not with this key "
                       f"({other.fingerprint})")
    assert other._secret.hex() not in message and key._secret.hex() not in message
    with pytest.raises(TypeError, match="key must be an msd_fast.Key"):
        check_key_matches("secret", key.fingerprint, "x.shard was encoded")


def test_kernels_for_names_the_module_of_a_backend_or_says_why_not():
    import msd_fast._C

    assert kernels_for("cpu") is msd_fast._C
    for status in backends().values():
        if status.name != "reference" and not status.available:
            with pytest.raises(BackendUnavailableError, match=status.name):
                kernels_for(status.name)


def test_image_columns_with_row_labels_and_short_columns(tmp_path):
    cipher = torch.tensor([[-2.0, 0.0], [1.0, 2.0]]).view(1, 1, 2, 2)
    assert ciphertext_pixels(cipher).flatten().tolist() == [0, 128, 191, 255]
    plain = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(3, 1, 1, 1)
    assert ciphertext_pixels(plain) is plain
    path = tmp_path / "grid.png"
    save_image_columns(str(path), [("full", plain), ("short", plain[:1])], row_labels=["a", "bb", "ccc"])
    with Image.open(path) as image:
        pixels = torch.from_numpy(np.array(image)).long()
    assert image.mode == "L"
    width = 6 * 3 + 6 + 96 + 6 + 96  # row-label margin, two cells of 96 px (16 px scaled 6x) and a gap
    assert image.size == (width, 14 + 3 * (96 + 6))
    short_left = 6 * 3 + 6 + 96 + 6
    row = lambda r: 14 + r * (96 + 6)  # noqa: E731
    assert pixels[row(1):row(1) + 96, short_left:].eq(255).all()  # the short column's missing cells stay blank
    assert pixels[row(0):row(0) + 96, short_left:].ne(255).any()


def test_the_run_recorder_writes_only_on_the_main_process(tmp_path):
    from msd_fast.server.checkpoint import load_checkpoint
    from msd_fast.server.distributed import ProcessInfo
    from msd_fast.server.logs import read_log
    from msd_fast.server.recorder import RunRecorder, weight_digest

    model = torch.nn.Linear(3, 2)
    for rank, folder in ((0, tmp_path / "main"), (1, tmp_path / "other")):
        folder.mkdir()
        config = _config(tmp_path, out=str(folder), epochs=1, log_every=2)
        info = ProcessInfo(rank=rank, world_size=1, device=torch.device("cpu"))
        recorder = RunRecorder(config, info, steps_per_epoch=3, start_epoch=0,
                               checkpoint_path=str(folder / "checkpoint.pt"))
        recorder.start(items=24)
        recorder.start_epoch()
        for step in range(3):  # as the trainer calls it: step() where a step is logged, tick() elsewhere
            if not recorder.logs(step, last_of_epoch=step == 2):
                recorder.tick()
                continue
            recorder.step(epoch=0, step=step, last_of_epoch=step == 2, loss=1.0 / (step + 1), lr=1e-3,
                          weight_decay=0.04, momentum=0.99, images_per_s=100.0)
        record = {"epoch": 0, "loss": 0.5, **recorder.epoch_timing()}
        assert record["seconds"] > 0 and record["images_per_s"] > 0
        if info.is_main:
            recorder.end_epoch(record, {"epoch": 1, "weights": model.state_dict()})
        summary = recorder.end(model, [record])
        assert summary["ranks_identical"] and summary["steps"] == 3 and summary["history"] == [record]
    assert sorted(os.listdir(tmp_path / "other")) == []
    assert sorted(os.listdir(tmp_path / "main")) == ["checkpoint.pt", "log.jsonl", "loss_curve.png"]
    events = read_log(str(tmp_path / "main" / "log.jsonl"))
    assert [(e["event"], e.get("step")) for e in events] == [("start", None), ("step", 0), ("step", 2),
                                                             ("epoch", None), ("end", None)]
    assert load_checkpoint(str(tmp_path / "main" / "checkpoint.pt"))["epoch"] == 1
    before = weight_digest(model)
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert weight_digest(model) != before
