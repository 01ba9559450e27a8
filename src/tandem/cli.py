"""The `tandem` command line: inspect and synth (chat, serve and bench come with their issues)."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tandem.errors import TandemError

app = typer.Typer(
    help="tandem: run huge MoE models from GGUF on one GPU plus a big-RAM CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
GpuExpertsFrom = Annotated[int | None, typer.Option(
    "--gpu-experts-from",
    help="Batches of at least N tokens (long prompts) compute the routed experts on the GPU, "
         "weights streamed over PCIe; 0: always on the CPU (default: a measured threshold).")]
GpuExpertShare = Annotated[str, typer.Option(
    "--gpu-expert-share",
    help="Fraction of each decode step's routed experts computed on the GPU "
         "while the CPU does the rest, their weights copied from the pinned file; 'auto': "
         "balanced per layer as it runs (default; +18-34% decode on the GPU machine); 0: none.")]
Numa = Annotated[str | None, typer.Option(
    "--numa",
    help="'interleave': spread the expert pages read into RAM over the memory nodes (machines "
         "with more than one socket; pages already cached keep their node). Default: leave "
         "them where Linux puts them.")]
GpuExpertCache = Annotated[float, typer.Option(
    "--gpu-expert-cache",
    help="GiB of VRAM for each layer's most used routed experts (counted as it runs), which "
         "the GPU expert share then reads from VRAM instead of over PCIe; 0: none (default). "
         "Needs --gpu-expert-share.")]
_state = {"debug": False}


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
):
    if version:
        from tandem import __version__

        console.print(f"tandem {__version__}")
        raise typer.Exit()
    _state["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="GGUF file, any member of a split set, or a folder.")],
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
):
    """Architecture, size, context, quant mix (and tensors) of a GGUF model."""
    from tandem.gguf import open_gguf
    from tandem.inspect import summarize

    with open_gguf(path) as model:
        summary = summarize(model)
    if as_json:
        if not tensors:
            summary.pop("tensors")
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary, tensors)


def _print_summary(s: dict, with_tensors: bool) -> None:
    from tandem.inspect import human_bytes, human_count

    files = s["files"]
    where = files[0]["path"] if len(files) == 1 else f"{files[0]['path']} (+{len(files) - 1} more)"
    console.print(f"[bold]{where}[/bold]")
    total_file = sum(f["bytes"] for f in files)
    rows = [
        ("architecture", s["architecture"]),
        ("name", s["name"] or "-"),
        ("files", f"{len(files)} ({human_bytes(total_file)})"),
        ("parameters", f"{human_count(s['parameters'])} ({s['parameters']:,})"),
        ("tensor data", f"{human_bytes(s['tensor_bytes'])}, {s['bits_per_weight']:.2f} bits/weight"),
        ("context length", f"{s['context_length']:,}" if s["context_length"] else "-"),
    ]
    tok = s["tokenizer"]
    if tok["model"]:
        template = ", chat template" if tok["chat_template"] else ""
        rows.append(("tokenizer", f"{tok['model']}, {tok['tokens'] or '?'} tokens{template}"))
    rows += [(k, str(v)) for k, v in s["hyperparameters"].items()]
    overview = Table.grid(padding=(0, 2))
    for key, value in rows:
        overview.add_row(f"[dim]{key}[/dim]", value)
    console.print(overview)

    mix = Table(title="quant mix", title_justify="left")
    for col in ("type", "tensors", "parameters", "size", "share"):
        mix.add_column(col, justify="left" if col == "type" else "right")
    for name, row in s["quant_mix"].items():
        mix.add_row(name, str(row["tensors"]), human_count(row["params"]),
                    human_bytes(row["bytes"]), f"{100 * row['share']:.1f}%")
    console.print(mix)

    if with_tensors:
        table = Table(title="tensors", title_justify="left")
        for col in ("name", "type", "shape", "size", "file"):
            table.add_column(col, justify="right" if col in ("size", "file") else "left")
        for t in s["tensors"]:
            table.add_row(t["name"], t["type"], " x ".join(map(str, t["shape"])),
                          human_bytes(t["bytes"]), str(t["file"]))
        console.print(table)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output .gguf (split sets get -0000N-of-0000M).")],
    preset: Annotated[str, typer.Option(help="Shape: tiny (tests) or r1 (DeepSeek-R1 dims).")] = "tiny",
    recipe: Annotated[str, typer.Option(help="ud-iq1_s, q4_k_m, q8_0, bf16, f16 or f32.")] = "q8_0",
    layers: Annotated[int | None, typer.Option(help="Total layers (preset's default if unset).")] = None,
    dense: Annotated[int | None, typer.Option(help="Leading dense layers.")] = None,
    type_rules: Annotated[list[str] | None, typer.Option(
        "--type", help="Per-tensor override REGEX=TYPE, e.g. 'ffn_down_exps=q2_k' (repeatable).")] = None,
    fill: Annotated[str, typer.Option(help="auto, random (valid random blocks), pool (random; the routed "
                                           "experts repeat 256 MB of them: fast, for speed benchmarks) "
                                           "or quantized.")] = "auto",
    split_kv_b: Annotated[bool, typer.Option(help="Write attn_k_b/attn_v_b, not attn_kv_b.")] = False,
    split_max_size: Annotated[str, typer.Option(help="Split into files of at most this size (10G).")] = "0",
    split_max_tensors: Annotated[int, typer.Option(help="Split into files of at most N tensors.")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
):
    """Write a GGUF with random weights for a shape preset and quant recipe."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from tandem.bench import synth as synthesis
    from tandem.inspect import human_bytes

    planned = synthesis.plan(preset, recipe, layers, dense, split_kv_b, type_rules or [])
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task(f"writing {out.name}", total=planned.total_bytes)
        paths = synthesis.write(
            planned, out, fill=fill, seed=seed, split_max_size=_parse_size(split_max_size),
            split_max_tensors=split_max_tensors,
            on_tensor=lambda name, n: progress.update(task, advance=n, description=name))
    console.print(f"wrote {len(paths)} file(s), {human_bytes(planned.total_bytes)} of tensors: "
                  + ", ".join(str(p) for p in paths))


@app.command()
def convert(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face DeepSeek folder.")],
    out: Annotated[Path, typer.Argument(help="Output .gguf.")],
    recipe: Annotated[str, typer.Option(help="A recipe (ud-iq1_s, ...) or one type (f32, q8_0).")] = "f32",
    type_rules: Annotated[list[str] | None, typer.Option(
        "--type", help="Per-tensor override REGEX=TYPE (repeatable).")] = None,
    split_kv_b: Annotated[bool, typer.Option(help="Write attn_k_b/attn_v_b, not attn_kv_b.")] = False,
):
    """Convert a Hugging Face DeepSeek folder to GGUF with llama.cpp's names (for tests)."""
    from tandem.convert import convert as run_convert

    paths = run_convert(model_dir, out, recipe=recipe, overrides=type_rules or [],
                        split_kv_b=split_kv_b)
    console.print("wrote " + ", ".join(str(p) for p in paths))


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise TandemError(f"expected true or false, got {value!r}")


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def chat(
    model: Annotated[Path | None, typer.Option("--model", "-m", "--gguf_path", "--gguf-path",
        help="GGUF file, split-set member or folder (default: the embedded SmolLM2-135M).")] = None,
    model_path: Annotated[Path | None, typer.Option("--model_path", "--model-path",
        help="Original Hugging Face folder (config.json) to complete the GGUF's config.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p",
        help="Answer this once and exit (a prompt on stdin works too).")] = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max_new_tokens", "--max-new-tokens", "-n",
        help="Most tokens per answer.")] = 1000,
    temperature: Annotated[float | None, typer.Option(
        help="0 is greedy (default: the file's, else 0.6).")] = None,
    top_p: Annotated[float | None, typer.Option("--top_p", "--top-p")] = None,
    top_k: Annotated[int | None, typer.Option("--top_k", "--top-k")] = None,
    min_p: Annotated[float | None, typer.Option("--min_p", "--min-p")] = None,
    repeat_penalty: Annotated[float | None, typer.Option(
        "--repeat_penalty", "--repeat-penalty")] = None,
    presence_penalty: Annotated[float | None, typer.Option(
        "--presence_penalty", "--presence-penalty")] = None,
    frequency_penalty: Annotated[float | None, typer.Option(
        "--frequency_penalty", "--frequency-penalty")] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed, same answer.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this string (repeatable).")] = None,
    force_think: Annotated[str, typer.Option("--force_think", "--force-think",
        help="true: start every answer inside <think> (R1-style reasoning).")] = "false",
    cpu_infer: Annotated[int | None, typer.Option("--cpu_infer", "--cpu-infer", "--threads",
        help="CPU threads for the expert kernels.")] = None,
    ctx_size: Annotated[int | None, typer.Option("--ctx-size", "--ctx_size", help="Context length.")] = None,
    rules: Annotated[Path | None, typer.Option(help="Placement rules (YAML).")] = None,
    gpu_experts_from: GpuExpertsFrom = None,
    gpu_expert_share: GpuExpertShare = "auto",
    gpu_expert_cache: GpuExpertCache = 0.0,
    numa: Numa = None,
):
    """Talk to a model: interactively, or once with -p / stdin."""
    from tandem.chat import terminal
    from tandem.chat.session import ChatSession
    from tandem.default_model import default_model_path
    from tandem.runtime import heap
    from tandem.runtime.llm import LLM
    from tandem.runtime.sampler import SamplingParams

    question = prompt if prompt is not None else terminal.read_stdin_prompt()
    path = model if model is not None else default_model_path()
    llm = LLM(path, model_path=model_path, rules=rules, ctx_size=ctx_size, n_threads=cpu_infer,
              progress=err_console.is_terminal, gpu_experts_from=gpu_experts_from,
              gpu_expert_share=gpu_expert_share, gpu_expert_cache=gpu_expert_cache, numa=numa)
    heap.settle(llm.gpu_share)  # no full garbage collection walks the loaded model mid-answer
    params = SamplingParams.defaults_for(llm.file.metadata).updated(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
        repetition_penalty=repeat_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, seed=seed, max_new_tokens=max_new_tokens,
        stop=tuple(stop) if stop else None)
    session = ChatSession.for_model(llm, params, model_path=model_path,
                                    force_think=_bool(force_think), system=system)
    if question is not None:
        terminal.answer(session, question, console, err_console)
    else:
        terminal.interactive(session, console, err_console)
    llm.close()


@app.command()
def serve(
    model: Annotated[Path | None, typer.Option("--model", "-m", "--gguf_path", "--gguf-path",
        help="GGUF file, split-set member or folder (default: the embedded SmolLM2-135M).")] = None,
    model_path: Annotated[Path | None, typer.Option("--model_path", "--model-path",
        help="Original Hugging Face folder (config.json) to complete the GGUF's config.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (KTransformers' tutorial uses 10002).")] = 10002,
    api_key: Annotated[str | None, typer.Option("--api-key", "--api_key",
        help="Require 'Authorization: Bearer KEY'.")] = None,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", "--max_batch_size",
        help="Sequences decoded together (each gets a KV cache of --ctx-size).")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Waiting requests before 429.")] = 64,
    ctx_size: Annotated[int | None, typer.Option("--ctx-size", "--ctx_size",
        help="Context per sequence.")] = None,
    served_model_name: Annotated[str | None, typer.Option("--served-model-name",
        help="Model name in the APIs (default: the file name).")] = None,
    cpu_infer: Annotated[int | None, typer.Option("--cpu_infer", "--cpu-infer", "--threads",
        help="CPU threads for the expert kernels.")] = None,
    rules: Annotated[Path | None, typer.Option(help="Placement rules (YAML).")] = None,
    force_think: Annotated[str, typer.Option("--force_think", "--force-think",
        help="true: every chat answer starts inside <think>.")] = "false",
    gpu_experts_from: GpuExpertsFrom = None,
    gpu_expert_share: GpuExpertShare = "auto",
    gpu_expert_cache: GpuExpertCache = 0.0,
    numa: Numa = None,
):
    """OpenAI- and Ollama-compatible server with continuous batching."""
    import uvicorn

    from tandem.default_model import default_model_path
    from tandem.server.app import create_app
    from tandem.server.state import ServerConfig

    config = ServerConfig(model=model if model is not None else default_model_path(),
                          model_path=model_path, served_model_name=served_model_name,
                          api_key=api_key, max_batch_size=max_batch_size, max_queue=max_queue,
                          ctx_size=ctx_size, n_threads=cpu_infer, rules=rules,
                          force_think=_bool(force_think), gpu_experts_from=gpu_experts_from,
                          gpu_expert_share=gpu_expert_share, gpu_expert_cache=gpu_expert_cache,
                          numa=numa)
    err_console.print(f"tandem: serving {config.model} on http://{host}:{port}/v1 "
                      f"(OpenAI) and http://{host}:{port}/api (Ollama); loading...",
                      highlight=False, soft_wrap=True)
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning")


@app.command()
def bench(
    model: Annotated[Path, typer.Argument(help="GGUF file, split-set member or folder.")],
    prompt_lengths: Annotated[str, typer.Option(help="Prompt lengths, comma-separated.")] = "128,1024",
    streams: Annotated[str, typer.Option(help="Concurrent streams, comma-separated.")] = "1,4",
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per run.")] = 32,
    repetitions: Annotated[int, typer.Option(help="Runs per figure (median reported).")] = 3,
    ctx_size: Annotated[int | None, typer.Option("--ctx-size", help="Context length.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", "--cpu_infer")] = None,
    rules: Annotated[Path | None, typer.Option(help="Placement rules (YAML).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the JSON result.")] = Path("bench-results"),
    gpu_experts_from: GpuExpertsFrom = None,
    gpu_expert_share: GpuExpertShare = "auto",
    gpu_expert_cache: GpuExpertCache = 0.0,
    numa: Numa = None,
):
    """Prefill/decode tok/s, first-token time, memory, and expert GB/s against the RAM roofline."""
    from datetime import UTC, datetime

    from tandem.bench import machine
    from tandem.bench.runner import BenchConfig, run

    def ints(text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise TandemError(f"expected comma-separated numbers, got {text!r}") from None

    config = BenchConfig(model, ints(prompt_lengths), ints(streams), new_tokens, repetitions,
                         ctx_size, threads, rules, gpu_experts_from, gpu_expert_share,
                         gpu_expert_cache, numa)
    results = run(config, progress=lambda line: err_console.print(line, highlight=False))
    now = datetime.now(UTC)
    record = {**machine.record_header("tandem bench", now, " ".join(["tandem", *sys.argv[1:]])),
              "model": str(model), "results": results}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{Path(model).stem}-{now:%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"wrote {path}")


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise TandemError(f"size {text!r} is not like 500M or 10G")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[match[2].upper()]
    return int(float(match[1]) * scale)


def main() -> None:
    try:
        app()
    except TandemError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
