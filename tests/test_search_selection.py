"""Checks a search makes before Ray starts: which selection mode its trials record (the
command line's when given, else the space's own; a space that selects by test metrics keeps
its "oracle" label, once overwritten with the command line's default "val"), a resumed
search's space, and a cluster address nothing answers at."""

from __future__ import annotations

import socket

import optuna
import pytest

from croft_search.contract import SEARCH_FILE
from croft_search.errors import ConfigError
from croft_search.run import main as run_main
from croft_search.search import ray_engine as search
from croft_search.search.folder import check_same_space
from croft_search.search.space import load_space

ORACLE_SPACE = """\
method: croft
fixed: {epochs: 2, selection: oracle}
search:
  lambda1: {uniform: [0, 15]}
objective: {pareto: [test_acc, test_auroc]}
num_samples: 4
"""
PLAIN_SPACE = ORACLE_SPACE.replace(", selection: oracle", "").replace(
    "[test_acc, test_auroc]", "[val_acc, val_auroc]"
)


def suggested(path, requested):
    space = load_space(str(path))
    suggest = search.Suggest(space, search._selection(space, requested))
    return suggest(optuna.create_study().ask())["selection"]


def test_the_space_selection_is_kept_unless_the_command_line_names_one(tmp_path):
    oracle = tmp_path / "oracle.yaml"
    oracle.write_text(ORACLE_SPACE)
    plain = tmp_path / "plain.yaml"
    plain.write_text(PLAIN_SPACE)
    assert suggested(oracle, None) == "oracle"
    assert suggested(oracle, "oracle") == "oracle"
    assert suggested(plain, None) == "val"
    assert suggested(plain, "oracle") == "oracle"
    with pytest.raises(ConfigError, match="selects by test metrics"):
        suggested(oracle, "val")


def test_contradicting_selection_is_a_one_line_error(tmp_path, capsys):
    oracle = tmp_path / "oracle.yaml"
    oracle.write_text(ORACLE_SPACE)
    argv = ["--space", str(oracle), "--selection", "val", "--storage", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as exit_info:
        run_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--selection val contradicts it" in err[0]
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_resume_refuses_a_changed_space(tmp_path, capsys):
    space_file = tmp_path / "plain.yaml"
    space_file.write_text(PLAIN_SPACE)
    space = load_space(str(space_file))
    folder = tmp_path / "runs" / space.name / "r"
    folder.mkdir(parents=True)
    (folder / SEARCH_FILE).write_text("{}")
    (folder / "space.yaml").write_text(space.to_yaml())
    argv = ["--space", str(space_file), "--storage", str(tmp_path / "runs"), "--name", "r"]
    with pytest.raises(SystemExit) as exit_info:
        run_main([*argv, "--resume", "--num-samples", "9"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs in: num_samples" in err[0]
    # The same space passes the check (and goes on to load features: stop it there).
    check_same_space(space, folder)
    with pytest.raises(ConfigError, match="differs in: fixed"):
        check_same_space(space.with_overrides(fixed_overrides={"lr": "0.01"}), folder)


def test_an_address_nothing_answers_at_fails_at_once(tmp_path, capsys):
    with socket.socket() as probe:  # a loopback port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    space_file = tmp_path / "plain.yaml"
    space_file.write_text(PLAIN_SPACE)
    argv = ["--space", str(space_file), "--storage", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as exit_info:
        run_main([*argv, "--address", f"127.0.0.1:{port}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in err[0]
    assert not (tmp_path / "runs").exists()
