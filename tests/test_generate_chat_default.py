"""`instructkit generate` wraps the prompt in the chat template when the saved model was trained with it
(a chat-tuned model fed the bare prompt answers nothing), and `--chat` / `--no-chat` override that."""

from __future__ import annotations

import json

import pytest

from instructkit import run_steps
from instructkit.cli import build_parser


class _Loaded(Exception):
    pass


@pytest.fixture
def seen(monkeypatch):
    configs = []

    def load(config):
        configs.append(config)
        raise _Loaded

    monkeypatch.setattr(run_steps, "load_run_model", load)
    return configs


def _saved(tmp_path, chat_template: bool, system_prompt=None):
    folder = tmp_path / ("chat" if chat_template else "plain")
    folder.mkdir()
    (folder / "instructkit_config.json").write_text(json.dumps(
        {"train_config": {"model": {"chat_template": chat_template, "system_prompt": system_prompt}}}))
    return str(folder)


@pytest.mark.parametrize("flag, chat_model, expected", [
    (None, True, True), (None, False, False), (False, True, False), (True, False, True)])
def test_generate_follows_how_the_model_was_trained(tmp_path, seen, flag, chat_model, expected):
    model = _saved(tmp_path, chat_model, system_prompt="Be brief: yes.")
    with pytest.raises(_Loaded):
        run_steps.generate_text(model, ["Who", "are", "you?"], chat_template=flag)
    assert seen[0].model.chat_template is expected
    assert seen[0].model.system_prompt == ("Be brief: yes." if flag is None and chat_model else None)


def test_generate_flags_parse_to_three_states():
    parser = build_parser()
    assert parser.parse_args(["generate", "--model", "m", "hi"]).chat is None
    assert parser.parse_args(["generate", "--model", "m", "--chat", "hi"]).chat is True
    assert parser.parse_args(["generate", "--model", "m", "--no-chat", "hi"]).chat is False
