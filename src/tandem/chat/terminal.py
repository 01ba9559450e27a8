"""`tandem chat` in a terminal: one-shot answers and the interactive loop."""

from __future__ import annotations

import sys

from rich.console import Console

from tandem.chat.session import ChatSession, Reply

HELP = "commands: /reset (forget the conversation), /exit (or Ctrl-D); end a line with \\ to continue it"


def answer(session: ChatSession, prompt: str, out: Console, err: Console) -> Reply:
    """Stream one answer: reasoning dimmed, then the answer; the speed line on stderr."""
    reply = Reply()
    shown = None
    try:
        for kind, text in session.ask(prompt, reply):
            if kind != shown:
                if kind == "answer" and shown == "reasoning":
                    out.print()
                shown = kind
            out.print(text, style="dim" if kind == "reasoning" else None, end="",
                      highlight=False, markup=False, soft_wrap=True)
    except KeyboardInterrupt:
        reply.finish_reason = "cancelled"
        out.print()
        err.print("(stopped)", style="yellow", highlight=False)
    out.print()
    t = session.llm.last_timings
    if t is not None:
        err.print(f"[dim]prompt eval: {t.prompt_tokens} tokens, {t.prompt_s:.2f} s, "
                  f"{t.prompt_tok_per_s:.1f} tok/s | eval: {t.decoded_tokens + 1} tokens, "
                  f"{t.prompt_s + t.decode_s:.2f} s ({t.decode_tok_per_s:.1f} tok/s after the "
                  f"first) | {reply.finish_reason}[/dim]", highlight=False, soft_wrap=True)
    return reply


def read_message(prompt: str = ">>> ") -> str | None:
    """One message from the user; lines ending in a backslash continue. None at EOF."""
    lines = []
    while True:
        try:
            line = input(prompt if not lines else "... ")
        except EOFError:
            return None
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def interactive(session: ChatSession, out: Console, err: Console) -> None:
    err.print(HELP, style="dim", highlight=False)
    while True:
        try:
            message = read_message()
        except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line, keep chatting
            out.print()
            continue
        if message is None or message.strip() == "/exit":
            return
        if message.strip() == "/reset":
            session.reset()
            err.print("(conversation reset)", style="dim", highlight=False)
            continue
        if message.strip() in ("/help", "/?"):
            err.print(HELP, style="dim", highlight=False)
            continue
        if not message.strip():
            continue
        answer(session, message, out, err)


def read_stdin_prompt() -> str | None:
    if sys.stdin is None or sys.stdin.isatty():
        return None
    text = sys.stdin.read()
    return text if text.strip() else None
