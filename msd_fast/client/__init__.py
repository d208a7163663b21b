"""The client (a data owner): the consortium key, encoding its images once into the shard it uploads, decrypting
what comes back, and fine-tuning the returned backbone on its own labels."""
from .classifier import ImageClassifier, exported_architecture, pretrained_classifier, random_classifier
from .encode import client_subset, decrypt_shard, encode_dataset, make_key
from .finetune import Recipe

__all__ = ["ImageClassifier", "Recipe", "client_subset", "decrypt_shard", "encode_dataset", "exported_architecture",
           "make_key", "pretrained_classifier", "random_classifier"]
