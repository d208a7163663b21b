import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from msd_fast import Key, encrypt_blocks, encrypt_patches
from msd_fast.vit import decrypt_vit, encrypt_vit

KEY = Key.from_secret(b"vit transform key")
# (img_size (H, W), patch, in_chans, model options)
VARIANTS = [
    ((16, 16), 8, 3, dict()),
    ((28, 42), 14, 1, dict(class_token=False, global_pool="avg")),
    ((32, 48), 16, 3, dict(reg_tokens=2, no_embed_class=True)),
    ((16, 24), 8, 1, dict(reg_tokens=1, no_embed_class=False, global_pool="max")),
    ((16, 16), 8, 3, dict(global_pool="map")),
    ((16, 16), 8, 3, dict(pos_embed="none", class_token=False, global_pool="avg")),
]
ENCRYPTIONS = [dict(), dict(negpos=True), dict(block_scramble=False, negpos=True), dict(pixel_shuffle=False)]


def _model(img_size, patch, in_chans, options, **extra):
    torch.manual_seed(0)
    return VisionTransformer(img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=24, depth=2,
                             num_heads=2, num_classes=5, **options, **extra).double().eval()


def _normalize(x, mean, std):
    shape = (1, -1, 1, 1)
    return (x - torch.tensor(mean, dtype=x.dtype).view(shape)) / torch.tensor(std, dtype=x.dtype).view(shape)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-p{v[1]}-c{v[2]}-{v[3]}")
@pytest.mark.parametrize("encryption", ENCRYPTIONS, ids=str)
def test_encrypted_model_on_encrypted_images_equals_model_on_plain(variant, encryption):
    img_size, patch, in_chans, options = variant
    model = _model(img_size, patch, in_chans, options)
    x = torch.rand(3, in_chans, *img_size, dtype=torch.float64)
    encrypted_model = encrypt_vit(model, KEY, max_value=1.0, **encryption)
    y = encrypt_patches(x, KEY, patch, **encryption)
    torch.testing.assert_close(encrypted_model(y), model(x), rtol=1e-10, atol=1e-10)
    if encryption.get("pixel_shuffle", True) or encryption.get("negpos", False):
        plain_out = model(x)  # a random-init ViT barely uses positions, so only value changes are checked here
        assert (model(y) - plain_out).abs().max() > 1e-2 * plain_out.abs().max()


@pytest.mark.parametrize("raw_max", [255.0, 1.0])
def test_normalisation_is_folded_for_raw_inputs(raw_max):
    model = _model((16, 24), 8, 3, dict())
    mean, std = [0.485 * raw_max, 0.456 * raw_max, 0.406 * raw_max], [0.229 * raw_max, 0.224 * raw_max, 0.225 * raw_max]
    x = torch.rand(2, 3, 16, 24, dtype=torch.float64) * raw_max
    if raw_max == 255.0:
        x = x.round()
    encrypted_model = encrypt_vit(model, KEY, negpos=True, max_value=raw_max, mean=mean, std=std)
    y = encrypt_patches(x, KEY, 8, negpos=True, max_value=raw_max)
    torch.testing.assert_close(encrypted_model(y), model(_normalize(x, mean, std)), rtol=1e-9, atol=1e-9)
    # Normalising after encryption (the naive way) is not equivalent, because pixel shuffling mixes channels.
    naive = encrypt_vit(model, KEY, negpos=True, max_value=raw_max)
    expected = model(_normalize(x, mean, std))
    assert (naive(_normalize(y, mean, std)) - expected).abs().max() > 1e-2 * expected.abs().max()


def test_uint8_images_through_the_encrypted_model():
    model = _model((16, 16), 8, 1, dict()).float()
    x = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    encrypted_model = encrypt_vit(model, KEY, negpos=True, max_value=255.0, mean=127.5, std=64.0)
    y = encrypt_patches(x, KEY, 8, negpos=True)
    torch.testing.assert_close(encrypted_model(y.float()), model((x.float() - 127.5) / 64.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("encryption", ENCRYPTIONS, ids=str)
def test_decrypt_vit_inverts_encrypt_vit(encryption):
    model = _model((16, 24), 8, 3, dict(reg_tokens=1))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    round_trip = decrypt_vit(encrypt_vit(model, KEY, max_value=1.0, mean=mean, std=std, **encryption), KEY,
                             max_value=1.0, mean=mean, std=std, **encryption)
    for (name, a), b in zip(model.state_dict().items(), round_trip.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_decrypt_vit_gives_a_plain_image_model():
    trained_on_encrypted = _model((16, 16), 8, 3, dict(reg_tokens=2))  # stands for a model pretrained on shards
    plain = decrypt_vit(trained_on_encrypted, KEY, negpos=True, max_value=1.0)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(plain(x), trained_on_encrypted(encrypt_patches(x, KEY, 8, negpos=True)),
                               rtol=1e-10, atol=1e-10)


def test_original_model_untouched_and_bias_created_when_needed():
    model = _model((16, 16), 8, 3, dict(), pre_norm=True)  # timm drops the patch-embedding bias with pre_norm
    assert model.patch_embed.proj.bias is None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    encrypted_model = encrypt_vit(model, KEY, negpos=True, max_value=1.0)
    assert encrypted_model.patch_embed.proj.bias is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(encrypted_model(encrypt_patches(x, KEY, 8, negpos=True)), model(x),
                               rtol=1e-10, atol=1e-10)


def test_unsupported_models_and_options_raise():
    model = _model((16, 16), 8, 3, dict())
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        encrypt_vit(torch.nn.Linear(2, 2), KEY)
    with pytest.raises(TypeError, match="key must be an msd_fast.Key"):
        encrypt_vit(model, "secret")
    with pytest.raises(ValueError, match="differs from the model's patch size"):
        encrypt_vit(model, KEY, patch_size=4)
    with pytest.raises(ValueError, match="max_value is required"):
        encrypt_vit(model, KEY, negpos=True)
    with pytest.raises(ValueError, match="per_sample"):
        encrypt_vit(model, KEY, per_sample=True)
    with pytest.raises(ValueError, match="one value per channel"):
        encrypt_vit(model, KEY, mean=(0.1, 0.2))
    with pytest.raises(ValueError, match="std must be non-zero"):
        encrypt_vit(model, KEY, std=0.0)
    dynamic = _model((16, 16), 8, 3, dict(), dynamic_img_size=True)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        encrypt_vit(dynamic, KEY)
    hybrid = _model((16, 16), 8, 3, dict())
    hybrid.patch_embed.proj = torch.nn.Conv2d(3, 24, kernel_size=8, stride=4)
    with pytest.raises(ValueError, match="kernel = stride"):
        encrypt_vit(hybrid, KEY)


# ---- the dense block transform (mixing=True) ------------------------------------------------------------------------
DENSE = [dict(), dict(block_scramble=False)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-p{v[1]}-c{v[2]}-{v[3]}")
@pytest.mark.parametrize("options", DENSE, ids=str)
def test_dense_encrypted_model_equals_model_on_plain(variant, options):
    img_size, patch, in_chans, model_options = variant
    model = _model(img_size, patch, in_chans, model_options)
    x = torch.rand(3, in_chans, *img_size, dtype=torch.float64)
    mean, std = 0.45, 0.27
    encrypted_model = encrypt_vit(model, KEY, pixel_shuffle=False, mixing=True, max_value=1.0, mean=mean, std=std,
                                  **options)
    y = encrypt_blocks(x, KEY, patch, max_value=1.0, out_dtype=torch.float64, backend="reference", **options)
    # float64 ciphertext: the fold is exact to float64 rounding of a sum over C*p*p values
    torch.testing.assert_close(encrypted_model(y), model((x - mean) / std), rtol=1e-9, atol=1e-9)
    plain_out = model(x)
    assert (model(y) - plain_out).abs().max() > 1e-2 * plain_out.abs().max()  # the ciphertext is not the image
    back = decrypt_vit(encrypted_model, KEY, pixel_shuffle=False, mixing=True, max_value=1.0, mean=mean, std=std,
                       **options)
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_dense_fold_takes_uint8_images_and_float16_ciphertext():
    model = _model((16, 16), 8, 3, dict()).float()
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    encrypted_model = encrypt_vit(model, KEY, pixel_shuffle=False, mixing=True, max_value=255.0, mean=120.0, std=60.0)
    expected = model((x.float() - 120.0) / 60.0)
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.float16, 2e-3)):  # float16: 11 significant bits
        y = encrypt_blocks(x, KEY, 8, out_dtype=dtype)
        torch.testing.assert_close(encrypted_model(y.float()), expected, rtol=tolerance, atol=tolerance)


def test_dense_per_sample_decrypt_folds_values_and_keeps_positions():
    trained = _model((16, 24), 8, 1, dict())  # stands for a model pretrained on per-sample block orders
    plain = decrypt_vit(trained, KEY, pixel_shuffle=False, mixing=True, max_value=1.0, per_sample=True)
    torch.testing.assert_close(plain.pos_embed, trained.pos_embed, rtol=0, atol=0)
    x = torch.rand(2, 1, 16, 24, dtype=torch.float64)
    y = encrypt_blocks(x, KEY, 8, block_scramble=False, max_value=1.0, out_dtype=torch.float64, backend="reference")
    torch.testing.assert_close(plain(x), trained(y), rtol=1e-9, atol=1e-9)  # the identity block order
    with pytest.raises(ValueError, match="per_sample"):
        encrypt_vit(trained, KEY, pixel_shuffle=False, mixing=True, max_value=1.0, per_sample=True)
    with pytest.raises(ValueError, match="replaces pixel_shuffle"):
        encrypt_vit(trained, KEY, mixing=True, max_value=1.0)
    with pytest.raises(ValueError, match="max_value is required"):
        encrypt_vit(trained, KEY, pixel_shuffle=False, mixing=True)
