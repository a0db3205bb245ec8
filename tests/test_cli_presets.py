"""The CLI dispatcher and the `presets` command."""

from tiny_transformer.cli import main


def test_presets_table_lists_true_counts(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "shakespeare" in out and "10,770,816" in out
    assert "llama_shakespeare_870k" in out and "869,504" in out


def test_presets_unknown_name_is_a_clear_error(capsys):
    assert main(["presets", "huge"]) == 1
    assert "unknown preset 'huge'" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
