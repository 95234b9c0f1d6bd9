"""``lora-monitor X --help`` describes every subcommand and every option, with its default."""

from __future__ import annotations

import argparse

from lora_monitor.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def test_every_subcommand_has_a_description_and_every_option_a_help_with_its_default():
    parser = build_parser()
    commands = _subcommands(parser)
    assert set(commands) >= {"analyze", "squeeze", "allocate", "edit", "report", "demo"}
    missing = []
    for name, command in commands.items():
        if not (command.description or "").strip():
            missing.append(f"{name}: no description")
        for action in _options(command):
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            text = (action.help or "").strip()
            if not text or text == argparse.SUPPRESS:
                missing.append(f"{label}: no help")
            # An option that has a default value says what it is (flags default to off: nothing to say).
            elif action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
                missing.append(f"{label}: help does not give its default {action.default!r}")
    assert not missing, "\n".join(missing)


def test_help_renders_for_every_subcommand(capsys):
    parser = build_parser()
    for name, command in _subcommands(parser).items():
        text = command.format_help()  # a bad %-format in a help string raises here
        assert command.description.split()[0] in text, name
        assert "--quiet" in text and "--verbose" in text, name
