"""Every command is declared one way (issue 14): a config dataclass whose fields are its flags. ``--help`` shows
every setting with its default, composed configs bring all their settings (one argument group each), the demo's
composed defaults are the ones it always used, and ``--quick`` is the one smoke-test switch (``--fast``: deprecated
alias)."""
import dataclasses
import re

import pytest

from msd_fast.cli.commands import build_parser, command_table, main
from msd_fast.cli.flags import dataclass_from_args
from msd_fast.client import Recipe
from msd_fast.evaluation import FedAvgSettings
from msd_fast.evaluation.demo import DemoConfig
from msd_fast.server import PretrainConfig

COMMANDS = {command.name: command for command in command_table()}
# the smallest command line of each command (its required settings)
REQUIRED = {"keygen": ["--out", "k.key"], "encode": ["--key", "k.key", "--data", "synthetic", "--out", "s.shard"],
            "pretrain": ["s.shard"], "export": ["--checkpoint", "c.pt", "--out", "m.safetensors"],
            "finetune": ["--data", "synthetic"], "probe": ["--data", "synthetic"],
            "fedavg": ["--data", "synthetic", "--clients", "2"],
            "export-timm": ["--model", "m.safetensors", "--key", "k.key", "--out", "timm_model"]}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _expected_default(field: dataclasses.Field) -> str:
    if "default_text" in field.metadata:
        return field.metadata["default_text"]
    if isinstance(field.default, tuple):
        return ",".join(map(str, field.default))
    return str(field.default)


def _help_blocks(name: str, capsys, monkeypatch) -> tuple[str, dict]:
    """``name --help`` unwrapped: the whole text and ``{option string: its help text}``."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    blocks, current = {}, None
    for line in text.splitlines():
        option = re.match(r"  (-[^ ,]+)", line)
        if option:
            current = option[1]
            blocks[current] = line
        elif current is not None and line.startswith("      "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return text, blocks


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_lists_every_setting_with_its_default(name, capsys, monkeypatch):
    text, blocks = _help_blocks(name, capsys, monkeypatch)
    for field in dataclasses.fields(COMMANDS[name].config):
        if field.metadata.get("positional"):
            assert re.search(rf"^  {field.name} ", text, re.M), field.name
            continue
        block = blocks.get(_flag(field.name))
        assert block is not None, f"{name} --help does not list {_flag(field.name)}"
        if field.metadata.get("required"):
            assert "(required)" in block, block
        else:
            assert f"(default: {_expected_default(field)})" in block, block


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_command_line_defaults_are_the_config_defaults(name):
    command = COMMANDS[name]
    args = build_parser().parse_args([name, *REQUIRED.get(name, [])])
    from_flags = dataclass_from_args(command.config, args)
    given = {f.name: getattr(from_flags, f.name) for f in dataclasses.fields(command.config)
             if f.default is None and getattr(from_flags, f.name) is not None}
    assert from_flags == command.config(**given)


def test_demo_help_shows_the_composed_pretraining_recipe_and_fedavg_settings(capsys, monkeypatch):
    text, blocks = _help_blocks("demo", capsys, monkeypatch)
    for title in ("pretraining (the server", "fine-tuning recipe (every method):",
                  "supervised FedAvg baseline"):
        assert title in text
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    pretraining = {f.name for f in dataclasses.fields(PretrainConfig)} - {
        "shards", "out", "device", "seed", "log_every", "resume", "progress"}
    renamed = {"batch_size": "pretrain_batch_size", "lr": "pretrain_lr", "min_lr": "pretrain_min_lr",
               "weight_decay": "pretrain_weight_decay", "weight_decay_end": "pretrain_weight_decay_end"}
    assert {renamed.get(n, n) for n in pretraining} <= names
    recipe = {"steps": "finetune_steps", "lr": "finetune_lr", "batch_size": "finetune_batch_size",
              "min_lr": "finetune_min_lr", "warmup_steps": "finetune_warmup_steps",
              "weight_decay": "finetune_weight_decay"}
    assert {recipe.get(f.name, f.name) for f in dataclasses.fields(Recipe) if f.name != "seed"} <= names
    assert {"fedavg_rounds", "fedavg_client_fraction"} <= names
    # the values Demo.pretrain_config() used to hard-code are visible settings with those defaults
    for option, default in (("--drop-path", "0.0"), ("--head-hidden-dim", "512"), ("--head-bottleneck-dim", "128"),
                            ("--momentum-teacher", "0.99"), ("--warmup-epochs", "max(1, --epochs // 10)"),
                            ("--pretrain-batch-size", "32"), ("--finetune-steps", "300"), ("--fedavg-rounds", "15")):
        assert f"(default: {default})" in blocks[option], blocks[option]


def test_the_demo_passes_on_the_settings_it_always_used():
    config = DemoConfig()
    pretrain = config.pretrain_config(["a.shard"], "out", 7, device="cpu")
    expected = PretrainConfig(shards=["a.shard"], out="out", arch="vit_tiny_patch16_224", depth=4, embed_dim=96,
                              num_heads=3, drop_path=0.0, out_dim=256, head_hidden_dim=512, head_bottleneck_dim=128,
                              global_keep=0.6, local_views=4, local_keep=0.25, teacher_views="all", contrast=0.0,
                              noise=0.0, embed_optimizer="rowwise", epochs=20, batch_size=32, lr=4e-3,
                              warmup_epochs=2, momentum_teacher=0.99, seed=7, device="cpu", progress=False)
    assert pretrain == expected
    assert [DemoConfig(epochs=e).pretrain_config(["a"], "o", 0, device="cpu").warmup_epochs
            for e in (1, 5, 20, 50)] == [1, 1, 2, 5]
    assert DemoConfig(warmup_epochs=0).pretrain_config(["a"], "o", 0, device="cpu").warmup_epochs == 0
    assert config.recipe(3) == Recipe(steps=300, lr=1e-3, layer_decay=0.75, refit_head=True, seed=3)
    assert config.recipe(3, 1500) == Recipe(steps=1500, lr=1e-3, layer_decay=0.75, refit_head=True, seed=3)
    assert config.fedavg_settings(3) == FedAvgSettings(rounds=15, local_steps=20, seed=3)
    assert DemoConfig(finetune_steps=100, fedavg_rounds=15).fedavg_settings(0).local_steps == 6


@pytest.mark.parametrize("change, message", [
    (dict(pretrain_batch_size=0), "--pretrain-batch-size must be >= 1, got 0"),
    (dict(pretrain_lr=-1.0), "--pretrain-lr must be a positive finite number"),
    (dict(drop_path=1.0), "--drop-path must be in [0, 1)"),
    (dict(finetune_warmup_steps=400), "--finetune-warmup-steps must be an int in [0, steps=300]"),
    (dict(finetune_batch_size=0), "--finetune-batch-size must be a positive int, got 0"),
    (dict(label_smoothing=1.0), "--label-smoothing must be in [0, 1)"),
    (dict(fedavg_client_fraction=0.0), "--fedavg-client-fraction must be in (0, 1]"),
    (dict(upper_bound_steps=0), "--upper-bound-steps must be a positive integer, got 0")])
def test_a_bad_composed_setting_is_refused_by_the_demo_flag(change, message):
    with pytest.raises(ValueError) as info:
        DemoConfig(**change)
    assert str(info.value).startswith(message), str(info.value)


def test_a_bad_composed_setting_on_the_command_line_is_one_line(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["demo", "--out", str(out), "--pretrain-lr", "-1", "--no-progress"]) == 2
    assert capsys.readouterr().err == ("msd-fast demo: error: --pretrain-lr must be a positive finite number, got "
                                       "-1.0\n")
    assert main(["finetune", "--data", "synthetic:16", "--warmup-steps", "301", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("msd-fast finetune: error: --warmup-steps must be an int in [0, ")
    assert not out.exists()


@pytest.mark.parametrize("name", ["demo", "audit"])
def test_quick_is_the_smoke_test_switch_and_fast_its_deprecated_alias(name, capsys):
    assert build_parser().parse_args([name, "--quick"]).quick is True
    assert capsys.readouterr().err == ""
    assert build_parser().parse_args([name]).quick is False
    assert build_parser().parse_args([name, "--fast"]).quick is True
    assert capsys.readouterr().err == f"msd-fast {name}: warning: --fast is deprecated; use --quick\n"


def test_quick_demo_replaces_every_size_but_keeps_where_and_how_it_runs(monkeypatch, tmp_path):
    import msd_fast.evaluation.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert main(["demo", "--fast", "--epochs", "99", "--out", str(tmp_path / "d"), "--seed", "4", "--device", "cpu",
                 "--no-progress"]) == 0
    config, = seen
    assert config == DemoConfig.smoke_test(out=str(tmp_path / "d"), seed=4, device="cpu", progress=False)
    assert config.epochs == 2 and config.quick is False


def test_mutually_exclusive_and_required_flags_are_one_line_refusals(capsys):
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--data", "synthetic", "--test-fraction", "0.3", "--test-data", "synthetic"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --test-data: not allowed with argument --test-fraction" in err
    with pytest.raises(SystemExit):
        main(["fedavg", "--data", "synthetic"])
    assert "the following arguments are required: --clients" in capsys.readouterr().err


def test_configs_built_in_python_check_what_argparse_checks_on_the_command_line():
    from msd_fast.cli.client import EncodeConfig, KeygenConfig
    from msd_fast.cli.downstream import FinetuneConfig

    with pytest.raises(ValueError, match="--out is required"):
        KeygenConfig()
    with pytest.raises(ValueError, match="--test-fraction: not allowed with --test-data"):
        FinetuneConfig(data="synthetic", test_fraction=0.3, test_data="synthetic")
    with pytest.raises(ValueError, match=r"--image-size must be at most 8192"):
        EncodeConfig(key="k", data="synthetic", out="s", image_size=(9000, 32))


def test_the_library_modules_keep_no_command_line_code():
    import msd_fast.client.encode as encode
    import msd_fast.evaluation.audit.report as report
    import msd_fast.evaluation.demo as demo

    for module in (encode, report, demo):
        assert "argparse" not in vars(module), module.__name__
        assert not [name for name in vars(module) if name.startswith(("add_", "run_")) and "argument" in name]


def test_a_part_renames_its_settings_in_messages_and_refuses_unknown_fields():
    from msd_fast.settings import Part

    part = Part(Recipe, "recipe", rename={"lr": "finetune_lr", "steps": "finetune_steps"})
    assert part.rename_message("lr must be > 0, got 0") == "--finetune-lr must be > 0, got 0"
    assert part.rename_message("--steps 5 is less than --eval-every 25") == \
        "--finetune-steps 5 is less than --eval-every 25"
    assert part.rename_message("learning went wrong") == "learning went wrong"  # not a setting's name
    with pytest.raises(TypeError, match="has no field"):
        Part(Recipe, "recipe", exclude=("no_such_setting",)).names()
