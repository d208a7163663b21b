"""What client and server agree on: the encryption's description (:class:`EncryptionSpec`), the shard a client
uploads once, and token mode's key-derived embedder."""
from .encryption import EncryptionSpec
from .shard_sets import open_shards
from .shards import Shard, ShardError, open_shard, write_shard

__all__ = ["EncryptionSpec", "Shard", "ShardError", "open_shard", "open_shards", "write_shard"]
