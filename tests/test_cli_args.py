"""The command line's list positionals (CONFIG and key=value overrides, a prompt's words) may sit on both
sides of a command's options, as the usage lines say (`instructkit train CONFIG.yaml [--resume]
[key=value ...]`); anything else unknown is still argparse's error (exit 2, naming it)."""

from __future__ import annotations

import pytest

from instructkit import cli
from instructkit.cli import build_parser, parse


@pytest.mark.parametrize(("argv", "field", "expected"), [
    (["train", "c.yaml", "--resume", "name=a", "train.seed=1"], "config", ["c.yaml", "name=a", "train.seed=1"]),
    (["train", "--resume", "c.yaml", "name=a"], "config", ["c.yaml", "name=a"]),
    (["train", "c.yaml", "name=a", "--resume"], "config", ["c.yaml", "name=a"]),
    (["run", "--force", "name=a"], "config", ["name=a"]),
    (["run", "c.yaml", "--force", "name=a", "eval.split=test"], "config", ["c.yaml", "name=a", "eval.split=test"]),
    (["generate", "--model", "m", "hello", "--max-new-tokens", "3", "world"], "prompt", ["hello", "world"]),
    (["templates", "check", "a.yaml", "--data", "d.csv", "b.yaml"], "files", ["a.yaml", "b.yaml"]),
])
def test_list_positionals_on_both_sides_of_options(argv, field, expected):
    args = parse(build_parser(), argv)
    assert getattr(args, field) == expected
    if argv[0] == "train":
        assert args.resume is True
    if argv[0] == "run":
        assert args.force is True


@pytest.mark.parametrize(("argv", "named"), [
    (["train", "c.yaml", "--restart", "name=a"], "--restart"),
    (["evaluate", "--model", "m", "--data", "d", "stray"], "stray"),
    (["templates", "show", "some_id", "other"], "other"),
])
def test_anything_else_unknown_exits_2_naming_it(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(build_parser(), argv)
    assert exc.value.code == 2
    assert f"unrecognized arguments: {named}" in capsys.readouterr().err


def test_train_gets_the_overrides_after_resume(monkeypatch, tmp_path):
    """`main` hands `cmd_train` every override, the ones after --resume too."""
    seen = {}

    def fake_train(args):
        seen.update(config=args.config, resume=args.resume)
        return 0

    parser = build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["train"].set_defaults(func=fake_train)
    assert cli.main(["train", "c.yaml", "--resume", "name=a", "train.lr=1e-4"]) == 0
    assert seen == {"config": ["c.yaml", "name=a", "train.lr=1e-4"], "resume": True}


@pytest.mark.parametrize("rank", ["0", "1"])
def test_under_a_launcher_only_rank_0_logs_info_and_the_others_say_which_rank(rank):
    """transformers' log_level_replica / accelerate's main-process-only logger: every process of a torchrun
    launch logged its INFO lines, so each one (resumed from..., FSDP2: sharded...) appeared once per process;
    the others now log warnings and above only, each line naming its rank."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import logging; from instructkit.cli import configure_logging; configure_logging(False); "
            "log = logging.getLogger('instructkit.train'); log.info('info line'); log.warning('warning line')")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "RANK": rank, "WORLD_SIZE": "2", "PYTHONPATH": src}
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr
    if rank == "0":
        assert "INFO info line" in err and "WARNING warning line" in err and "[rank" not in err
    else:
        assert "info line" not in err and "WARNING [rank 1] warning line" in err
