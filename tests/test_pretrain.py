"""Server pretraining: learning, export into timm (exact folding, exact decryption), exact resume, DDP equivalence,
and that the server never opens a key file."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from msd_fast import EncryptionSpec, Key, decrypt_vit, encrypt_blocks, encrypt_patches
from msd_fast.client.encode import encode_dataset
from msd_fast.data import ImageSet
from msd_fast.server import PretrainConfig, export_backbone, load_exported, pretrain
from msd_fast.server.checkpoint import load_checkpoint
from msd_fast.server.schedules import cosine_schedule
from msd_fast.server.trainer import Pretraining
from msd_fast.protocol.shards import shard_metadata, write_shard

KEY = Key.from_secret(b"pretrain test key")
ENCRYPTION = {"block_scramble": True, "pixel_shuffle": True, "negpos": True, "max_value": 255.0, "per_sample": False}


def structured_images(n: int, seed: int) -> torch.Tensor:
    """``uint8 [n, 1, 32, 32]``: a bright disc or a bright bar at a random place, on a noisy background."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images = 40 + 20 * torch.rand(n, 32, 32, generator=generator)
    for i in range(n):
        cy, cx = (6 + 20 * torch.rand(2, generator=generator)).tolist()
        if i % 2:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 < 25
        else:
            shape = ((yy - cy).abs() < 2) & ((xx - cx).abs() < 9)
        images[i][shape] += 150
    return images.clamp(0, 255).to(torch.uint8).unsqueeze(1)


def write_client_shard(path, images, key=KEY):
    meta = shard_metadata(mode="image", count=len(images), item_shape=images.shape[1:], dtype="uint8", patch_size=4,
                          image_size=images.shape[2:], channels=1, key_fingerprint=key.fingerprint,
                          encryption=ENCRYPTION, client=os.path.basename(path))
    encrypted = encrypt_patches(images, key, 4, negpos=True, max_value=255.0)
    write_shard(path, [encrypted[i:i + 16] for i in range(0, len(images), 16)], meta)
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    return [write_client_shard(folder / f"client{c}.shard", structured_images(48, seed=c)) for c in range(2)]


def tiny_config(shards, out, **changes) -> PretrainConfig:
    options = dict(shards=shards, out=str(out), depth=2, embed_dim=48, num_heads=3, drop_path=0.1, out_dim=64,
                   head_hidden_dim=96, head_bottleneck_dim=32, global_keep=0.6, local_views=2, local_keep=0.25,
                   epochs=3, batch_size=16, lr=2e-3, warmup_epochs=1, progress=False, log_every=1)
    return PretrainConfig(**(options | changes))


def assert_same_training(expected: dict, got: dict, lr_sum: float) -> None:
    """Two checkpoints of one run computed in different summation orders agree.

    Adam divides each gradient element by its own running magnitude, so an element whose gradient is ~0 moves by
    about the learning rate whatever rounding noise it got: the runs may differ by up to that elementwise. So: every
    tensor must agree to 1e-3 in relative norm, and elementwise within the Adam step bound (4x the summed learning
    rates). Two parameters have an exactly zero gradient -- the attention key bias (softmax ignores a shift shared
    by all keys) and the final norm's bias (the head's BatchNorm removes constant shifts) -- so they are pure noise
    and only the elementwise bound applies. BatchNorm running statistics see that norm bias and are never read in
    training: skipped."""
    for part in ("student", "teacher"):
        for name, value in expected[part].items():
            if not value.is_floating_point() or ".running_" in name:
                continue
            other = got[part][name]
            assert float((other - value).abs().max()) <= 4 * lr_sum, f"{part}.{name}"
            if name.endswith("attn.qkv.bias"):  # query and value biases only: the key bias is noise
                dim = value.shape[0] // 3
                other, value = torch.cat([other[:dim], other[2 * dim:]]), torch.cat([value[:dim], value[2 * dim:]])
            if name.endswith("backbone.norm.bias"):
                continue
            relative = float((other - value).norm() / value.norm().clamp_min(1e-12))
            assert relative < 1e-3, f"{part}.{name}: relative difference {relative:.2e}"


def test_cosine_schedule():
    values = cosine_schedule(1.0, 0.1, 4, 5, warmup_epochs=1, warmup_start=0.0)
    assert values.shape == (20,) and values[0] == 0.0 and values[5] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1) and (values[5:][1:] <= values[5:][:-1]).all()
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_schedule(1.0, 0.1, 2, 5, warmup_epochs=3)


def test_pretrain_learns_exports_and_the_client_decrypts_exactly(shards, tmp_path):
    summary = pretrain(tiny_config(shards, tmp_path / "run", epochs=5, lr=1e-2, momentum_teacher=0.95))
    losses = [epoch["loss"] for epoch in summary["history"]]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.1, losses  # measured: 4.44 -> 4.03
    assert {"checkpoint.pt", "log.jsonl", "loss_curve.png"} <= set(os.listdir(tmp_path / "run"))

    metadata = export_backbone(str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "model.safetensors"))
    assert metadata["key_fingerprint"] == KEY.fingerprint and metadata["encryption"] == ENCRYPTION
    with pytest.raises(FileExistsError):
        export_backbone(str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "model.safetensors"))
    model, loaded = load_exported(str(tmp_path / "model.safetensors"))
    assert loaded == metadata and model.num_classes == 0
    model.eval().double()

    # The export folds the server's input standardisation: raw encrypted pixels in, the teacher's features out.
    state = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    mean, std = state["input_stats"]
    plain = structured_images(4, seed=9)
    encrypted = encrypt_patches(plain, KEY, 4, negpos=True, max_value=255.0).double()
    reference, _ = load_exported(str(tmp_path / "model.safetensors"))
    reference.load_state_dict({k[9:]: v for k, v in state["teacher"].items() if k.startswith("backbone.")})
    reference.eval().double()
    with torch.no_grad():
        # The folded weights are stored in float32: agreement to float32 rounding of the patch embedding.
        torch.testing.assert_close(model(encrypted), reference((encrypted - mean) / std), rtol=1e-5, atol=1e-5)
        # The client's plain-image model is exact: m_plain(x) == m(encrypt(x)).
        plain_model = decrypt_vit(model, KEY, negpos=True, max_value=255.0)
        torch.testing.assert_close(plain_model(plain.double()), model(encrypted), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("per_sample", [False, True])
def test_dense_shards_pretrain_export_and_decrypt(tmp_path, per_sample):
    spec = EncryptionSpec(per_sample=per_sample)
    images = torch.cat([structured_images(24, seed=c) for c in range(2)])
    path = str(tmp_path / "dense.shard")
    encode_dataset(ImageSet(images), KEY, path, patch_size=4, encryption=spec, sample_id_start=0, progress=False)
    pretrain(tiny_config([path], tmp_path / "run", epochs=1))
    metadata = export_backbone(str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "model.safetensors"))
    assert EncryptionSpec.from_metadata(metadata["encryption"]) == spec
    model, _ = load_exported(str(tmp_path / "model.safetensors"))
    model.eval().double()
    plain_model = decrypt_vit(model, KEY, **spec.vit_options())
    plain = structured_images(3, seed=9)
    # the client's plain-image model equals the exported model on the float64 ciphertext (identity block order
    # for per-sample: the server's position embedding was trained on random orders)
    cipher = encrypt_blocks(plain, KEY, 4, block_scramble=not per_sample, out_dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(plain_model(plain.double()), model(cipher), rtol=1e-5, atol=1e-5)


def test_resume_after_a_crash_gives_the_uninterrupted_weights(shards, tmp_path, monkeypatch):
    pretrain(tiny_config(shards, tmp_path / "straight"))
    expected = load_checkpoint(str(tmp_path / "straight" / "checkpoint.pt"))

    original = Pretraining.train_step

    def crash_in_second_epoch(self, inputs, epoch, step):
        if epoch == 1 and step == self.steps_per_epoch + 2:
            raise KeyboardInterrupt("killed")
        return original(self, inputs, epoch, step)

    monkeypatch.setattr(Pretraining, "train_step", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_config(shards, tmp_path / "resumed"))
    assert load_checkpoint(str(tmp_path / "resumed" / "checkpoint.pt"))["epoch"] == 1
    monkeypatch.setattr(Pretraining, "train_step", original)
    pretrain(tiny_config(shards, tmp_path / "resumed", resume=True))
    resumed = load_checkpoint(str(tmp_path / "resumed" / "checkpoint.pt"))
    assert resumed["epoch"] == expected["epoch"] == 3
    for part in ("student", "teacher", "dino_loss"):
        for name, value in expected[part].items():
            assert torch.equal(resumed[part][name], value), f"{part}.{name}"

    with pytest.raises(ValueError, match="different settings.*lr"):
        pretrain(tiny_config(shards, tmp_path / "resumed", resume=True, lr=1e-3))


def test_bad_configurations_are_explained(shards, tmp_path):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        pretrain(tiny_config(shards, tmp_path / "a", batch_size=200))
    with pytest.raises(ValueError, match="--global-keep"):
        tiny_config(shards, tmp_path / "b", global_keep=1.5)
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        pretrain(tiny_config(shards, tmp_path / "c", arch="resnet18", depth=None, embed_dim=None, num_heads=None))
    other_key = Key.from_secret(b"another consortium")
    foreign = write_client_shard(tmp_path / "foreign.shard", structured_images(16, seed=5), key=other_key)
    with pytest.raises(ValueError, match="different key"):
        pretrain(tiny_config([shards[0], foreign], tmp_path / "d"))


def test_the_server_never_opens_a_key_file(shards, tmp_path):
    key_path = tmp_path / "consortium.key"
    KEY.save(key_path)
    script = f"""
import sys
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and args else None)
from msd_fast.cli.commands import main
main(["pretrain", *{shards!r}, "--out", {str(tmp_path / 'run')!r}, "--depth", "1", "--embed-dim", "24",
      "--num-heads", "2", "--out-dim", "32", "--head-hidden-dim", "32", "--head-bottleneck-dim", "16",
      "--epochs", "1", "--batch-size", "16", "--local-views", "1", "--warmup-epochs", "0", "--no-progress"])
assert any(p.endswith("client0.shard") for p in opened), "the audit hook saw no shard being opened"
keys = [p for p in opened if p.endswith(".key") or "consortium" in p]
print("KEY FILES OPENED:", keys)
sys.exit(1 if keys else 0)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pretrained 1 epochs" in result.stdout


def test_two_gloo_processes_match_one_process_with_the_global_batch(shards, tmp_path):
    config = tiny_config(shards, tmp_path / "ddp", epochs=2, drop_path=0.0)
    args = ["pretrain", *shards, "--out", config.out, "--depth", "2", "--embed-dim", "48", "--num-heads", "3",
            "--drop-path", "0", "--out-dim", "64", "--head-hidden-dim", "96", "--head-bottleneck-dim", "32",
            "--local-views", "2", "--epochs", "2", "--batch-size", "16", "--lr", "2e-3", "--warmup-epochs", "1",
            "--log-every", "1", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "msd_fast.cli", *args], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = open(os.path.join(config.out, "log.jsonl")).read()
    assert '"processes": 2' in log and '"ranks_identical": true' in log

    pretrain(dataclasses.replace(config, out=str(tmp_path / "single")))
    distributed = load_checkpoint(os.path.join(config.out, "checkpoint.pt"))
    single = load_checkpoint(str(tmp_path / "single" / "checkpoint.pt"))
    assert_same_training(single, distributed, Pretraining(config).lr.sum())
    # The center is a running mean of the teacher's logits: it carries the weights' summation noise, so it is
    # compared like them, in relative norm (elementwise, its entries near 0 are that noise).
    center, distributed_center = single["dino_loss"]["center"], distributed["dino_loss"]["center"]
    assert float((distributed_center - center).norm() / center.norm()) < 1e-4


def test_token_mode_pretrains_on_permuted_tokens_and_exports(tmp_path):
    from msd_fast import permute_tokens
    from msd_fast.protocol.token_embedding import TokenEmbedder

    embedder = TokenEmbedder.from_key(KEY, patch_size=4, in_chans=1, image_size=(32, 32), embed_dim=24)
    tokens = permute_tokens(embedder(structured_images(32, seed=3)), KEY, list(range(32))).half()
    meta = shard_metadata(mode="token", count=32, item_shape=tokens.shape[1:], dtype="float16", patch_size=4,
                          image_size=(32, 32), channels=1, key_fingerprint=KEY.fingerprint,
                          encryption={"embed_dim": 24, "sample_id_start": 0})
    write_shard(tmp_path / "tokens.shard", [tokens], meta)
    config = tiny_config([str(tmp_path / "tokens.shard")], tmp_path / "run", embed_dim=None, depth=1, num_heads=2,
                         epochs=1)
    with pytest.raises(ValueError, match="differs from the token shards' D = 24"):
        pretrain(dataclasses.replace(config, embed_dim=48))
    pretrain(config)
    metadata = export_backbone(str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "model.safetensors"))
    model, _ = load_exported(str(tmp_path / "model.safetensors"))
    assert metadata["mode"] == "token" and model.pos_embed is None and model.embed_dim == 24


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default(shards, tmp_path):
    """A checkpoint written before --fused-head and --compile existed ran as their defaults: --resume accepts it,
    and still refuses a run that turns one of them on."""
    pretrain(tiny_config(shards, tmp_path, epochs=1))
    path = str(tmp_path / "checkpoint.pt")
    state = load_checkpoint(path)
    for name in ("fused_head", "compile"):
        del state["config"][name]
    torch.save(state, path)
    pretrain(tiny_config(shards, tmp_path, epochs=1, resume=True))  # nothing left to train: restore alone
    assert load_checkpoint(path)["epoch"] == 1
    with pytest.raises(ValueError, match="different settings.*fused_head"):
        pretrain(tiny_config(shards, tmp_path, epochs=1, resume=True, fused_head=True))


def test_a_non_finite_loss_stops_the_run_naming_its_step_before_any_checkpoint(shards, tmp_path, monkeypatch):
    """Losses are read every --log-every steps (no device sync per step); a non-finite one then stops the run with
    the step it happened at, before the epoch's checkpoint is written."""
    from msd_fast.server import trainer

    original = trainer.distillation_step

    def diverging(*args, step, **kwargs):
        loss = original(*args, step=step, **kwargs)
        return loss * float("nan") if step == 2 else loss

    monkeypatch.setattr(trainer, "distillation_step", diverging)
    with pytest.raises(FloatingPointError, match="at step 2;"):
        pretrain(tiny_config(shards, tmp_path, log_every=4))
    assert not os.path.exists(tmp_path / "checkpoint.pt")
    steps = [event["step"] for event in map(json.loads, open(tmp_path / "log.jsonl")) if event["event"] == "step"]
    assert steps == [0]  # step 0 was logged; the read at step 4 found step 2's loss
