"""The ``spiking-lm`` entry point: its command list and how errors end."""

from __future__ import annotations

import pytest

from spiking_lm.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    main(["--help"])
    listed = capsys.readouterr().out.split("Available subcommands:")[1]
    for name in COMMANDS:
        assert f"\n    {name} " in listed, name
    assert "predict" not in listed


# validate and test share fit's LightningCLI parser, which takes seconds to build.
@pytest.mark.parametrize("name", [name for name in COMMANDS if name not in ("validate", "test")])
def test_every_command_runs_its_own_help(capsys, name):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage:") and "--help" in out


def test_fit_help_shows_the_config_fields_docstrings_after_a_parse_that_skipped_them(capsys):
    # Field docstrings are read only for --help (they cost most of the parser's start-up), so a help after an
    # ordinary command line must still get them.
    with pytest.raises(SystemExit):
        main(["fit", "--model.gpt.n_head", "3", "--model.gpt.n_embd", "16"])
    assert "must be divisible by n_head" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "Simulation steps S each token is presented for" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "no command given; choose one of fit, validate, test, generate, export, evaluate, sweep"),
        (["predict"], "unknown command 'predict'"),
        (["fitt", "--config", "x.yaml"], "unknown command 'fitt'"),
    ],
)
def test_a_missing_or_unknown_command_is_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("spiking-lm: error: ") and message in err
    assert "Traceback" not in err


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("SPIKING_LM_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown command 'predict'"):
        main(["predict"])
