"""The trainers' command lines come from their config dataclasses (rlhfv_train/run/flags.py), and the module names
of before the layout by concern still work, with a FutureWarning."""
import dataclasses

import pytest

from rlhfv_train import ddpo, grpo
from rlhfv_train.ddpo import TrainConfig
from rlhfv_train.grpo import GRPOConfig
from rlhfv_train.eval import cli as eval_cli
from rlhfv_train.run import flags
from rlhfv_train.run.config import RunConfig

CONFIGS = [(TrainConfig, ddpo.build_parser, ddpo.config_from_args),
           (GRPOConfig, grpo.build_parser, grpo.config_from_args),
           (eval_cli.EvalConfig, eval_cli.build_parser, lambda args: eval_cli.EvalConfig(**vars(args)))]


@pytest.mark.parametrize("config, build_parser, config_from_args", CONFIGS)
def test_every_option_field_is_a_flag_with_the_field_default(config, build_parser, config_from_args):
    parser = build_parser()
    by_dest = {action.dest: action for action in parser._actions}
    option_fields = flags.flag_fields(config)
    assert len(option_fields) >= 15
    for field in option_fields:
        action = by_dest[field.name]
        assert flags.flag_name(field) in action.option_strings
        if field.type == "bool":
            assert action.nargs == 0 and action.default is field.default
        elif not field.metadata.get("unset"):
            assert action.default == field.default, field.name
    # A field without option() (a test hook) has no flag.
    assert "stop_after" not in by_dest
    # No arguments: the config's defaults, except what the embedded tiny model decides.
    cfg = config_from_args(parser.parse_args([]))
    tiny_decides = {"sft_steps", "sft_weight"}
    for field in dataclasses.fields(config):
        if field.name not in tiny_decides:
            assert getattr(cfg, field.name) == field.default, field.name


def test_switches_unset_flags_presets_and_short_names():
    cfg = ddpo.config_from_args(ddpo.build_parser().parse_args(
        ["--no-inplace-backward", "--packing", "--preset", "authors", "--beta", "0.3", "--model", "m"]))
    assert (cfg.inplace_backward, cfg.packing, cfg.gamma, cfg.beta, cfg.mode) == (False, True, 1.1, 0.3, "sum")
    assert (cfg.sft_steps, cfg.sft_weight) == (0, 0.0)  # a --model: no SFT stage, no SFT term by default
    cfg = ddpo.config_from_args(ddpo.build_parser().parse_args([]))
    assert (cfg.sft_steps, cfg.sft_weight, cfg.gamma) == (ddpo.TINY_SFT_STEPS, 1.0, 5.0)
    cfg = grpo.config_from_args(grpo.build_parser().parse_args(["-k", "3", "--no-scale-rewards", "--grad-checkpointing",
                                                               "--init-weights", "w.pt"]))
    assert (cfg.num_generations, cfg.scale_rewards, cfg.grad_checkpointing, cfg.sft_steps) == (3, False, True, 0)
    assert grpo.config_from_args(grpo.build_parser().parse_args([])).sft_steps == grpo.TINY_SFT_STEPS


def test_bad_flags_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        grpo.build_parser().parse_args(["--judge", "scene", "--reward", "scene"])  # one reward
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grpo.build_parser().parse_args(["--loss-type", "nope"])
    with pytest.raises(SystemExit):
        ddpo.build_parser().parse_args(["--lr", "fast"])


def test_a_new_option_is_one_field():
    @dataclasses.dataclass
    class Config(RunConfig):
        new_knob: float = flags.option(0.5, "a knob")
        on_by_default: bool = flags.option(True, "turn it off")
        picked: str = flags.option("a", "one of two", choices=("a", "b"))
        sizes: tuple[int, ...] = flags.option((2, 4), "one or more sizes")

    args = flags.build_parser(Config, "prog", "").parse_args(["--new-knob", "2", "--no-on-by-default", "--picked",
                                                              "b", "--sizes", "3", "5", "7"])
    values = flags.given_values(Config, args)
    assert (values["new_knob"], values["on_by_default"], values["picked"]) == (2.0, False, "b")
    assert values["sizes"] == [3, 5, 7]
    assert flags.given_values(Config, flags.build_parser(Config, "prog", "").parse_args([]))["sizes"] == (2, 4)
    with pytest.raises(TypeError, match="int, float, str or bool"):
        @dataclasses.dataclass
        class Bad(RunConfig):
            listed: list = flags.option(None, "a list")
        flags.build_parser(Bad, "prog", "")
