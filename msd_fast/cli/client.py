"""The client's commands: ``msd-fast keygen`` (a consortium key) and ``msd-fast encode`` (the one shard a client
uploads). Each is a config dataclass (its fields are the flags) and a ``run_*`` function of it; the work is
:func:`~msd_fast.client.encode.make_key` and :func:`~msd_fast.client.encode.encode_dataset`."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

from ..checks import require
from ..client.encode import DEFAULT_EMBED_DIM, MODES, TOKEN_DTYPES, warn_if_weak
from ..data import SPEC_HELP
from ..data.convert import check_image_size
from ..checks import check_positive_int
from ..protocol.encryption import CIPHER_DTYPES, SCHEMES, EncryptionSpec
from ..protocol.shard_sets import DEFAULT_MAX_SHARD_SIZE
from ..settings import Part, build_part, check_required, compose, flag
from .flags import image_size, pixel_stats

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class KeygenConfig:
    out: Optional[str] = flag(None, "key file to write (mode 0600)", required=True)
    secret_file: Optional[str] = flag(None, "derive the key from this file's exact bytes (same file -> same key on "
                                            "every client)", default_text="a fresh random key")
    force: bool = flag(False, "replace an existing key file")

    def __post_init__(self):
        check_required(self)


def run_keygen(config: KeygenConfig) -> int:
    from ..client.encode import make_key

    key = make_key(config.out, secret_file=config.secret_file, overwrite=config.force)
    print(f"wrote consortium key {config.out} (fingerprint {key.fingerprint}); share it with the other clients only, "
          "never with the server")
    return 0


@dataclasses.dataclass
class EncryptionFlags:
    """The image-mode encryption settings: one :class:`~msd_fast.protocol.encryption.EncryptionSpec`."""

    scheme: str = flag("dense", "dense: the key's orthogonal transform of every block; permute: block scrambling + "
                                "pixel shuffling (+ negative-positive), broken by the audit, for comparison",
                       choices=SCHEMES)
    per_sample: bool = flag(True, "a different block order for every image (--no-per-sample: one key-wide order, "
                                  "weaker: see SECURITY.md)")
    block_scramble: bool = flag(True, "reorder the blocks (--no-block-scramble needs --no-per-sample; weak: see "
                                      "SECURITY.md)")
    pixel_shuffle: bool = flag(True, "--scheme permute: shuffle the values inside every block")
    negpos: bool = flag(False, "--scheme permute: add the negative-positive transform")
    cipher_dtype: str = flag("float16", "--scheme dense: the ciphertext's storage type (float16: 2 bytes per value)",
                             choices=sorted(CIPHER_DTYPES))

    def spec(self) -> EncryptionSpec:
        """The spec these settings describe (its own checks name what does not fit together)."""
        if self.scheme == "dense" and self.negpos:
            raise ValueError("--negpos belongs to --scheme permute; the dense transform already mixes every value")
        return EncryptionSpec(scheme=self.scheme, block_scramble=self.block_scramble, per_sample=self.per_sample,
                              pixel_shuffle=self.scheme == "permute" and self.pixel_shuffle, negpos=self.negpos,
                              cipher_dtype=self.cipher_dtype)


@dataclasses.dataclass
@compose(Part(EncryptionFlags, "image-mode encryption"))
class EncodeConfig:
    key: Optional[str] = flag(None, "the consortium key file", required=True)
    data: Optional[str] = flag(None, SPEC_HELP,
                               required=True)
    out: Optional[str] = flag(None, "the shard file to write (a folder of numbered shards when larger than "
                                    "--max-shard-size; an unfinished folder is resumed)", required=True)
    patch_size: int = flag(16, "the ViT's patch size")
    image_size: Optional[Union[int, tuple]] = flag(None, "resize to S or HxW, at most 8192 per side", parse=image_size,
                                                   default_text="as stored; synthetic data: 32")
    channels: Optional[int] = flag(None, "convert to gray (1) or RGB (3)", choices=(1, 3), default_text="as stored")
    split: str = flag("train", ".npz split / folder split / synthetic draw", choices=SPLITS)
    mode: str = flag("image", "image: encrypted pixels; token: key-embedded, per-image permuted tokens", choices=MODES)
    embed_dim: int = flag(DEFAULT_EMBED_DIM, "token mode: token width D, must equal the ViT's")
    token_dtype: str = flag("float16", "token mode: the tokens' storage type", choices=sorted(TOKEN_DTYPES))
    sample_id_start: Optional[int] = flag(None, "first per-image id (per-sample / token mode)", default_text="random")
    client: Optional[str] = flag(None, "client name stored in the shard", default_text="the file name")
    clients: Optional[int] = flag(None, "simulate a consortium: split the data among N clients and encode one of them",
                                  default_text="no split")
    client_index: Optional[int] = flag(None, "which simulated client (0..N-1)", default_text="no split")
    alpha: Optional[float] = flag(None, "non-IID simulation: Dirichlet concentration over classes",
                                  default_text="IID")
    seed: int = flag(0, "seed of the simulated client split")
    batch_size: int = flag(64, "images per batch (memory use is a few batches)")
    device: str = flag("cpu", "where to encrypt (cpu, cuda, cuda:N)")
    max_shard_size: str = flag(DEFAULT_MAX_SHARD_SIZE, "largest shard file, e.g. 500MB or 2GB; larger data is "
                                                       "written as a folder of numbered shards plus index.json")
    force: bool = flag(False, "replace an existing shard (or shard folder)")

    def __post_init__(self):
        check_required(self)
        check_image_size(self.image_size, "--image-size")
        check_positive_int(self.batch_size, "--batch-size")
        check_positive_int(self.patch_size, "--patch-size")
        if self.simulate and (self.clients is None or self.client_index is None):
            raise ValueError("--clients N and --client-index i go together (and --alpha needs both)")
        if self.clients is not None:
            require(self, "clients", lambda v: v >= 1, "a positive integer")
            require(self, "client_index", lambda v: 0 <= v < self.clients, f"in [0, {self.clients})")
        self.encryption()

    @property
    def simulate(self) -> bool:
        """Encode one simulated client of a split consortium."""
        return self.clients is not None or self.client_index is not None or self.alpha is not None

    def encryption(self) -> Optional[EncryptionSpec]:
        """The image-mode spec (None in token mode, where the encryption flags must keep their defaults)."""
        if self.mode != "image":
            changed = [name for name, on in (("--scheme permute", self.scheme != "dense"),
                                             ("--no-block-scramble", not self.block_scramble),
                                             ("--negpos", self.negpos)) if on]
            if changed:
                raise ValueError(f"{', '.join(changed)} only apply to --mode image")
            return None
        return build_part(self, EncryptionFlags).spec()


def run_encode(config: EncodeConfig) -> int:
    from ..client.encode import client_subset, encode_dataset
    from ..data import load_dataset
    from ..keys import Key
    from ..protocol.shard_sets import open_shards

    key = Key.load(config.key)  # before reading any data: a wrong key path fails at once
    images = load_dataset(config.data, size=config.image_size, channels=config.channels, split=config.split)
    if config.simulate:
        images = client_subset(images, config.clients, config.client_index, alpha=config.alpha, seed=config.seed)
    client = config.client if config.client is not None else os.path.splitext(
        os.path.basename(os.path.normpath(config.out)))[0]
    spec = config.encryption()
    if spec is not None:
        warn_if_weak(spec)
    meta = encode_dataset(images, key, config.out, patch_size=config.patch_size, mode=config.mode, encryption=spec,
                          embed_dim=config.embed_dim, token_dtype=config.token_dtype,
                          sample_id_start=config.sample_id_start, client=client, batch_size=config.batch_size,
                          overwrite=config.force, device=config.device, max_shard_size=config.max_shard_size)
    shape = "x".join(map(str, meta.item_shape))
    how = EncryptionSpec.from_metadata(meta.encryption).describe() if meta.mode == "image" else "token mode"
    print(f"encoded {meta.count} images ({'x'.join(map(str, images.geometry))} uint8) of {images.description} with "
          f"{how} (patch {meta.patch_size}) -> {config.out}")
    if os.path.isdir(config.out):
        files = open_shards([config.out], verify=False)[0]
        size = (f"{len(files)} shards of at most {config.max_shard_size} "
                f"({sum(os.path.getsize(f.path) for f in files):,} bytes) and index.json, sha256 of the parts' "
                f"sha256s {meta.checksum}")
    else:
        size = f"{os.path.getsize(config.out):,} bytes, sha256 {meta.checksum}"
    print(f"  items {shape} {meta.dtype}, {size}, key fingerprint {meta.key_fingerprint}, client '{meta.client}'; "
          f"no labels written")
    return 0


@dataclasses.dataclass
class ExportTimmConfig:
    model: Optional[str] = flag(None, "the exported backbone (.safetensors from msd-fast export)", required=True)
    key: Optional[str] = flag(None, "the consortium key the backbone was pretrained with", required=True)
    out: Optional[str] = flag(None, "the folder to write (config.json + model.safetensors)", required=True)
    mean: Union[float, list] = flag(127.5, "input mean the model expects, in pixel units [0, 255], one value or one "
                                           "per channel (image mode; exact for any value; 127.5 = timm's 0.5)",
                                    parse=pixel_stats)
    std: Union[float, list] = flag(63.75, "input std in pixel units, one value or one per channel (63.75 = timm's "
                                          "0.25)", parse=pixel_stats)
    force: bool = flag(False, "replace an existing folder")

    def __post_init__(self):
        check_required(self)


def run_export_timm(config: ExportTimmConfig) -> int:
    from ..client.timm_export import export_timm
    from ..keys import Key

    written = export_timm(config.model, Key.load(config.key), config.out, mean=config.mean, std=config.std,
                          overwrite=config.force)
    model_args = written["model_args"]
    print(f"wrote {config.out}: {written['architecture']} depth {model_args['depth']}, width "
          f"{model_args['embed_dim']}, {model_args['in_chans']}x{model_args['img_size'][0]}x"
          f"{model_args['img_size'][1]} plain images; load it with "
          f"timm.create_model('local-dir:{config.out}', pretrained=True, num_classes=N)")
    return 0
