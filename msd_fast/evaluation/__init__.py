"""Evaluation: how the pretrained body is judged and what it is judged against -- frozen-feature probes, the
fine-tuning-only and FedAvg baselines, metrics, communication accounting, the privacy audit (:mod:`.audit`) and
the demo that runs them all (:mod:`.demo`)."""
from .communication import Communication, state_dict_bytes
from .tasks import LabelledSplit, build_classifier, fedavg_baseline, finetune_and_evaluate, probe
from .fedavg import FedAvgSettings, fedavg, weighted_average
from .metrics import classification_metrics

__all__ = ["Communication", "FedAvgSettings", "LabelledSplit", "build_classifier",
           "classification_metrics", "fedavg", "fedavg_baseline", "finetune_and_evaluate",
           "probe", "state_dict_bytes", "weighted_average"]
