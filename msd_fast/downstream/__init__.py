"""Client-side downstream evaluation: fine-tuning (plain or encrypted domain), frozen-feature probes, the
fine-tuning-only and FedAvg baselines, metrics and communication accounting."""
from .classifier import ImageClassifier, pretrained_classifier, random_classifier
from .communication import Communication, state_dict_bytes
from .evaluation import LabelledSplit, build_classifier, fedavg_baseline, finetune_and_evaluate, probe
from .fedavg import FedAvgSettings, fedavg, weighted_average
from .metrics import classification_metrics
from .training import Recipe

__all__ = ["Communication", "FedAvgSettings", "ImageClassifier", "LabelledSplit", "Recipe", "build_classifier",
           "classification_metrics", "fedavg", "fedavg_baseline", "finetune_and_evaluate", "pretrained_classifier",
           "probe", "random_classifier", "state_dict_bytes", "weighted_average"]
