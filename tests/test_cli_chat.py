"""`lorakit chat`: a prompt with line editing and history in a terminal, commands that say what they do."""
from __future__ import annotations

import io
import sys

import pytest

from lorakit.cli.chat import HELP, PROMPT, LineReader, run_chat
from lorakit.cli.main import main
from tests.test_train_fixtures import write_tiny_model_dir


def scripted(*lines: str) -> LineReader:
    return LineReader(io.StringIO("".join(line + "\n" for line in lines)), interactive=False)


def test_commands_say_what_they_do_and_reset_forgets_the_conversation():
    seen, out = [], []

    def reply(history):
        seen.append([m["content"] for m in history])
        return f"reply {len(seen)}"

    replies = run_chat(reply, scripted("hello", "more", "/help", "/reset", "again", "/bogus", "/exit", "unread"),
                       out.append)
    assert replies == 3
    assert seen == [["hello"], ["hello", "reply 1", "more"], ["again"]]  # after /reset only the new message
    text = "\n".join(out)
    assert all(command in text for command in HELP)  # /help lists every command with what it does
    assert "conversation cleared (2 earlier messages forgotten)" in text
    assert "unknown command /bogus; /help lists the commands" in text
    assert "unread" not in str(seen)  # /exit leaves


def test_a_terminal_gets_a_prompt_readline_editing_and_a_saved_history(tmp_path, monkeypatch):
    readline = pytest.importorskip("readline")
    history = tmp_path / "chat_history"
    history.write_text("an earlier question\n")
    readline.clear_history()
    prompts = []
    answers = iter(["hello"])

    def fake_input(prompt):
        prompts.append(prompt)
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    try:
        reader = LineReader(io.StringIO(), interactive=True, history=history)
        assert reader.readline is readline  # input() edits lines through readline once it is imported
        assert readline.get_history_item(readline.get_current_history_length()) == "an earlier question"
        run_chat(lambda h: "hi", reader, lambda text: None)
        readline.add_history("hello")  # (input() adds it in a real terminal)
        reader.close()
    finally:
        readline.clear_history()
    assert prompts == [PROMPT, PROMPT]  # a visible prompt for each line, until Ctrl-D
    assert history.read_text().split() == ["an", "earlier", "question", "hello"]


def test_chat_command_end_to_end_on_piped_input(tmp_path, monkeypatch, capsys):
    model = write_tiny_model_dir(tmp_path / "model")
    monkeypatch.setattr(sys, "stdin", io.StringIO("where is the key\n/reset\n/exit\n"))
    main(["chat", "--model", model, "--max-new-tokens", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "/help lists the commands" in out
    assert out.count("assistant: ") == 1
    assert "conversation cleared (1 earlier message forgotten)" in out
