import pytest

from posttrain.cli import build_parser, main


def test_print_config_shows_resolved_values(capsys):
    assert main(["train", "--print-config", "--set", "algorithm=ppo", "--set", "rollout.group_size=2"]) == 0
    out = capsys.readouterr().out
    assert "algorithm: ppo" in out and "group_size: 2" in out


def test_bad_config_exits_2_naming_the_key(capsys):
    assert main(["train", "--set", "rollout.group_sise=2"]) == 2
    assert "rollout.group_sise" in capsys.readouterr().err


def test_subcommands_exist():
    parser = build_parser()
    for command in ("train", "eval", "classic"):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([command, "--help"])
        assert exit_info.value.code == 0
