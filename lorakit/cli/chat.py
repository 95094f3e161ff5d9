"""`lorakit chat`: a conversation with a base model plus adapter(s) in the terminal.

In a terminal, lines are read through the standard library's `readline`: the arrow keys move and edit the
line, Up/Down recall earlier messages, Ctrl-R searches them, and the history is kept between sessions in
`chat_history` under lorakit's cache folder. (prompt_toolkit would add multi-line input and completion; a
dependency for what readline already gives was not worth it. Where Python has no readline, e.g. on Windows,
the console's own line editing applies.) Piped input (`lorakit chat < questions.txt`) is read line by line,
without prompts.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, TextIO

PROMPT = "you> "
HISTORY_LENGTH = 1000
"""Lines kept in the history file."""
HELP = {"/help": "show these commands",
        "/reset": "forget the conversation so far: the model sees only the messages that follow",
        "/exit": "leave (also /quit, or Ctrl-D on an empty line)"}


def history_path() -> Path:
    """Where the chat's line history is kept (lorakit's cache folder, $LORAKIT_CACHE to move it)."""
    from ..models.gguf_cache import cache_root

    return cache_root() / "chat_history"


class LineReader:
    """Reads the user's lines: with readline editing, a prompt and a saved history in a terminal; plain lines
    from a pipe. `read()` returns None at the end of input (Ctrl-D)."""

    def __init__(self, stdin: Optional[TextIO] = None, interactive: Optional[bool] = None,
                 history: Optional[Path] = None):
        self.stdin = sys.stdin if stdin is None else stdin
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self.history = history
        self.readline = None
        if self.interactive:
            try:
                import readline  # (importing it gives input() line editing)
            except ImportError:
                readline = None
            self.readline = readline
            self._load_history()

    def read(self, prompt: str = PROMPT) -> Optional[str]:
        if not self.interactive:
            line = self.stdin.readline()
            return line.rstrip("\n") if line else None
        try:
            return input(prompt)
        except EOFError:
            print()  # leave the terminal on a fresh line
            return None

    def close(self) -> None:
        """Save the history (a read-only or missing cache folder only costs the history)."""
        if self.readline is None or self.history is None:
            return
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.readline.set_history_length(HISTORY_LENGTH)
            self.readline.write_history_file(str(self.history))
        except OSError:
            pass

    def _load_history(self) -> None:
        if self.readline is None or self.history is None or not self.history.is_file():
            return
        try:
            self.readline.read_history_file(str(self.history))
        except OSError:
            pass


def run_chat(reply: Callable[[list[dict]], str], reader: LineReader, write: Callable[[str], None] = print) -> int:
    """The conversation loop: each message goes to `reply(history)` with the turns before it; /commands
    (HELP) act on the conversation. Returns the number of replies given."""
    history: list[dict] = []
    replies = 0
    write("lorakit chat: type a message and press Enter. /help lists the commands; /exit or Ctrl-D leaves.")
    while True:
        try:
            line = reader.read()
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as a shell does
            write("")
            continue
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _command(text, history, write):
                break
            continue
        history.append({"role": "user", "content": text})
        try:
            answer = reply(history)
        except KeyboardInterrupt:  # Ctrl-C while the model writes: drop this turn, keep the conversation
            history.pop()
            write("(reply interrupted; the message was dropped from the conversation)")
            continue
        history.append({"role": "assistant", "content": answer})
        replies += 1
        write(f"assistant: {answer}")
    return replies


def _command(text: str, history: list[dict], write: Callable[[str], None]) -> bool:
    """Carry out a /command; False means leave."""
    name = text.split()[0].lower()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        write("\n".join(f"  {command:<8} {what}" for command, what in HELP.items()))
    elif name == "/reset":
        turns = sum(1 for message in history if message["role"] == "user")
        history.clear()
        write(f"conversation cleared ({turns} earlier message{'s' * (turns != 1)} forgotten); "
              "the next message starts a new one")
    else:
        write(f"unknown command {name}; /help lists the commands (a message cannot start with /)")
    return True


def chat(opts) -> None:
    """`lorakit chat` with GenerateOptions `opts`: load the model (and adapters), then converse."""
    from ..data import format_prompt
    from ..evaluate import generate_texts
    from .commands import load_with_adapters

    model, tokenizer = load_with_adapters(opts, task="causal-lm")

    def reply(history: list[dict]) -> str:
        return generate_texts(model, tokenizer, [format_prompt(history, tokenizer)], opts.max_new_tokens)[0]

    reader = LineReader(history=history_path())
    try:
        run_chat(reply, reader, write=lambda text: print(text, flush=True))
    finally:
        reader.close()
