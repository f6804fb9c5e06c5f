"""`dalle_train.flags.add_flag`: every flag's spellings, its destination and its help text; the
launchers' arguments dalle-train accepts before its command."""

from __future__ import annotations

import argparse

import pytest

from dalle_train import cli
from dalle_train.flags import add_flag


def test_a_flag_has_its_dashed_and_underscored_spellings_and_its_aliases() -> None:
    parser = argparse.ArgumentParser()
    action = add_flag(parser, "--some-flag", "--alias-one", "--some_flag", "--alias_two", help="what it does")
    assert action.option_strings == ["--some-flag", "--some_flag", "--alias-one", "--alias_two"]
    assert action.dest == "some_flag"
    assert action.help == "what it does (also --alias-one, --alias_two)"  # not the underscored twin
    assert parser.parse_args(["--alias_two", "x"]).some_flag == "x"
    single = add_flag(parser, "--gentext", "--gentxt", action="store_true", help="complete the prompt")
    assert single.option_strings == ["--gentext", "--gentxt"]  # one word: no underscored twin
    assert single.help == "complete the prompt (also --gentxt)"


def test_help_is_left_alone_without_aliases_or_without_help() -> None:
    parser = argparse.ArgumentParser()
    assert add_flag(parser, "--lone", help="alone").help == "alone"
    assert add_flag(parser, "--hidden", "--secret", help=argparse.SUPPRESS).help == argparse.SUPPRESS
    assert add_flag(parser, "--bare", "--naked").help is None


def test_a_given_destination_is_kept() -> None:
    action = add_flag(argparse.ArgumentParser(), "--distr-backend", dest="distributed_backend")
    assert action.dest == "distributed_backend"


@pytest.mark.parametrize("name", ["--some_flag", "-s", "some-flag"])
def test_a_flag_is_named_with_two_dashes_and_no_underscore(name: str) -> None:
    with pytest.raises(AssertionError, match=f"flag {name} must be spelled with dashes"):
        add_flag(argparse.ArgumentParser(), name)


def test_the_deepspeed_launchers_local_rank_before_the_command_is_accepted_and_not_a_given_flag() -> None:
    for spelling in ("--local_rank=1", "--local-rank=1"):
        args = cli.build_parser().parse_args([spelling, "plugins"])
        assert args.local_rank == 1 and args.command == "plugins"
        assert cli.given_flags([spelling, "plugins"]) == set()
