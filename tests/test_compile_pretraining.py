"""Pretraining with ``--compile``: the student's and teacher's features run as compiled graphs with masked_gather
inside (no graph break), the step gives eager's loss and weights up to float32 rounding, the index-range check is
still skipped for the drawn views, and the checkpoints keep the eager networks' keys."""
import pytest
import torch

from msd_fast.ops import masked_gather as masked_gather_module
from msd_fast.server.model import MaskedSamplingNet
from msd_fast.server.trainer import Pretraining

from test_pretrain import structured_images, tiny_config, write_client_shard


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return [write_client_shard(tmp_path_factory.mktemp("compile") / "client.shard", structured_images(32, seed=0))]


def _train(shard, out, compile: bool, steps: int = 2) -> tuple:
    run = Pretraining(tiny_config(shard, out, drop_path=0.0, compile=compile))
    inputs = run.data.take(torch.arange(16))
    return run, [run.train_step(inputs, epoch=0, step=step) for step in range(steps)]


def test_compiled_step_matches_eager_and_keeps_the_checkpoint_keys(shard, tmp_path, monkeypatch):
    def no_reduction(*args, **kwargs):
        raise AssertionError("masked_gather reduced the index range (a device sync) for drawn views")
    monkeypatch.setattr(masked_gather_module.torch, "aminmax", no_reduction)
    eager, eager_losses = _train(shard, tmp_path / "eager", compile=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, compiled_losses = _train(shard, tmp_path / "compiled", compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # the student's and the teacher's
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=0)
    # Rounding can flip the sign of a near-zero gradient, and Adam turns that into a full step of the other sign:
    # the bound is a few lr per step for the student, (1 - momentum) of that for the EMA teacher.
    adam_bound = 3 * float(eager.lr[:2].sum())
    for name, atol in (("student", adam_bound), ("teacher", adam_bound * (1 - float(eager.momentum[:2].min())))):
        mine, theirs = getattr(compiled, name).state_dict(), getattr(eager, name).state_dict()
        assert list(mine) == list(theirs) and not any("_orig_mod" in key for key in mine)
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=atol, msg=f"{name} {key}")
    state = compiled.state(epoch=1)
    fresh = Pretraining(tiny_config(shard, tmp_path / "fresh", drop_path=0.0))
    fresh.student.load_state_dict(state["student"])  # strict: the eager network loads a compiled run's checkpoint
    fresh.teacher.load_state_dict(state["teacher"])


def test_compiled_features_have_no_graph_break_and_hold_the_custom_op(shard, tmp_path):
    run = Pretraining(tiny_config(shard, tmp_path, drop_path=0.0, compile=True))
    inputs = run.data.take(torch.arange(16))
    views = run.views(0)
    explained = torch._dynamo.explain(MaskedSamplingNet.features)(run.student, inputs, views.all)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    targets = [str(node.target) for node in explained.graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count("msd_fast.masked_gather.default") == len(views.all), targets
