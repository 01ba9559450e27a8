"""`tandem chat` as people use it: one-shot, stdin, interactive in a real terminal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import tandem
from tandem.chat.session import ChatSession, Reply
from tandem.gguf.writer import write_gguf
from tandem.placement.rules import Rule
from tandem.runtime.sampler import SamplingParams

pexpect = pytest.importorskip("pexpect")  # a test dependency; absent on the GPU machine

QUESTION = "Explain what a GPU is in one sentence."
CPU_RULES = [Rule(r"^token_embd\.", "cpu", "ggml"), Rule(".", "cpu", "torch")]


# Exact greedy texts below are the float32 CPU path's; a GPU would run the model in bfloat16.
CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def tandem_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem.cli", *args], capture_output=True,
                          text=True, timeout=600, input=stdin, env=CPU_ONLY)


def test_one_shot_greedy_answer_on_the_default_model(smollm2_gguf):
    run = tandem_cli("chat", "-p", QUESTION, "--temperature", "0")
    assert run.returncode == 0, run.stderr
    assert "Graphics Processing Unit" in run.stdout
    assert "prompt eval:" in run.stderr and "tok/s" in run.stderr
    assert "leaked" not in run.stderr  # the heap frozen once loaded is handed back at exit (runtime.heap)


def test_prompt_on_stdin_and_ktransformers_flags(smollm2_gguf):
    run = tandem_cli("chat", "--gguf_path", str(smollm2_gguf), "--max_new_tokens", "4",
                     "--temperature", "0", "--force_think", "false", "--cpu_infer", "2",
                     stdin="What is the capital of France?")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "The capital of France"  # greedy, cut at 4 tokens
    assert "eval: 4 tokens" in run.stderr and "| length" in run.stderr


def test_same_seed_same_answer(smollm2_gguf):
    args = ("chat", "-p", "Write a haiku about memory.", "--temperature", "1.0", "-n", "24")
    first = tandem_cli(*args, "--seed", "11")
    again = tandem_cli(*args, "--seed", "11")
    assert first.returncode == 0 and first.stdout == again.stdout


def test_force_think_prompt_and_split(smollm2_gguf):
    with tandem.LLM(smollm2_gguf, rules=CPU_RULES) as llm:
        session = ChatSession.for_model(llm, SamplingParams(temperature=0, max_new_tokens=12),
                                        force_think=True)
        ids, _ = session.prompt_ids("Hi")
        assert session.tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>\n")
        reply = Reply()
        kinds = {kind for kind, _ in session.ask("Hi", reply)}
        # SmolLM2 never closes the forced <think>: everything it wrote is reasoning.
        assert kinds == {"reasoning"} and reply.reasoning and reply.answer == ""
        assert session.history[-1] == {"role": "assistant", "content": ""}


def test_stop_strings(smollm2_gguf):
    with tandem.LLM(smollm2_gguf, rules=CPU_RULES) as llm:
        session = ChatSession.for_model(llm, SamplingParams(temperature=0, stop=("Processing",)))
        reply = Reply()
        text = "".join(t for _, t in session.ask(QUESTION, reply))
        assert text == reply.answer == "A GPU (Graphics "
        assert reply.finish_reason == "stop"


def test_template_injection_gguf_is_refused(smollm2_gguf, tmp_path):
    model = tandem.open_gguf(smollm2_gguf)
    metadata = {k: v for k, v in model.metadata.items() if k != "general.architecture"}
    metadata["tokenizer.chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    tensors = [(n, t.shape, t.ggml_type) for n, t in model.tensors.items()]
    evil = write_gguf(tmp_path / "evil.gguf", "llama", metadata, tensors,
                      lambda name, shape, t: model.raw(name))[0]
    run = tandem_cli("chat", "-m", str(evil), "-p", "hi")
    assert run.returncode == 1
    assert "chat template (GGUF) tried something unsafe and was refused" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")
def test_interactive_session_in_a_terminal(smollm2_gguf):
    # A suite started from a background shell job inherits SIGINT ignored, and Python keeps it
    # ignored: the child gets the default action back, as in a terminal.
    child = pexpect.spawn(sys.executable, ["-m", "tandem.cli", "chat", "--temperature", "0",
                                           "-n", "200"], encoding="utf-8", timeout=180,
                          dimensions=(40, 200), env=CPU_ONLY,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        child.expect_exact(">>> ")
        child.sendline(QUESTION)
        child.expect("Graphics Processing Unit")
        child.expect("prompt eval: .* tok/s")
        child.expect_exact(">>> ")
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.expect_exact(">>> ")
        # A long answer (as a first turn the greedy story runs past -n 200), stopped with
        # Ctrl-C: back to the prompt, the program still running.
        child.sendline("Write a very long story about a dragon who learns to paint.")
        child.expect_exact("learns to paint.")  # the terminal's echo of the line, before the
        child.expect(r"\w+ \w+ \w+ \w+")  # answer streams (a Ctrl-C still at the prompt drops it)
        child.sendintr()
        child.expect_exact("(stopped)")
        child.expect_exact(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
