"""The `quantprism` command line (thin: parsing and printing; work lives in the modules below)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

import click

from .. import __version__
from ..errors import QuantprismError, disk_full

DEFAULT_TARGETS = Path("targets.toml")


def _console(stderr: bool = False):
    from rich.console import Console

    # CI logs: no truncation
    return Console(soft_wrap=False, width=max(160, int(os.environ.get("COLUMNS", "0") or 0)), stderr=stderr)


def _run_options(f):
    """--device, --max-memory and --quiet: how the long commands run and report."""
    f = click.option("--quiet", is_flag=True, help="No progress bars or step lines (errors and the final report only).")(f)
    f = click.option("--max-memory", default=None,
                     help="RAM the canonical pass may use, e.g. 12GB (default: half of the available memory); "
                          "activations beyond it spill to disk. A build also runs the original model's torch row in "
                          "its checkpoint dtype, or skips it, when float32 would not fit.")(f)
    f = click.option("--device", default="auto", show_default=True,
                     help="Where the layer being solved runs: auto (a CUDA GPU when present), cpu, cuda or cuda:N.")(f)
    return f


@contextlib.contextmanager
def _progress(console, quiet: bool):
    """Rich bars with ETA on a terminal; plain, throttled log lines when stdout is not a TTY (CI); nothing if quiet."""
    import logging

    from .. import progress

    logger = logging.getLogger("quantprism")
    if quiet:
        logger.setLevel(logging.WARNING)
        yield
        return
    if console.is_terminal:
        with progress.rich_progress(console) as bars, progress.reporting(progress.RichReporter(bars)):
            yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with progress.reporting(progress.LogReporter(logger)):
            yield
    finally:
        logger.removeHandler(handler)


def _memory(text: str | None) -> int | None:
    from ..quantize.activations import parse_bytes

    return parse_bytes(text) if text else None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantprism")
@click.option("--allow-symlinks", is_flag=True, help="Accept model folders whose files are symlinks leading outside "
              "them (e.g. a Hugging Face cache snapshot).")
def cli(allow_symlinks: bool) -> None:
    """quantprism — one canonical quantization stage, every runtime, one verdict.

    \b
    Example:
      quantprism inspect                 # the bundled reference model
      quantprism targets targets.toml    # validate the deployment matrix
    """
    if allow_symlinks:
        os.environ["QUANTPRISM_ALLOW_SYMLINKS"] = "1"  # read by model loading in this process and the build's workers


@cli.command("targets", epilog="Example:  quantprism targets targets.toml")
@click.argument("file", type=click.Path(path_type=Path), default=DEFAULT_TARGETS, required=False)
@click.option("--model", "model", default=None, help="Check shape rules against this model (default: [defaults].model).")
def targets_cmd(file: Path, model: str | None) -> None:
    """Validate a targets file and print the target matrix.

    Keys, types and combinations are checked, then every target's shape rules (k-quant blocks,
    group sizes) against the model: an impossible target is an error (exit 2).
    """
    from rich.table import Table

    tf, info = _load_targets(file, model)
    from ..calibration.sources import check_source, eval_text_path

    check_source(tf.defaults.calibration)  # every path the file names, before a build finds it missing
    eval_text_path(tf.defaults.eval_text)
    table = Table(title=f"{file} — {len(tf.targets)} targets on {info.path.name}")
    for col in ("target", "format", "runtime", "scheme", "method", "hardware", "gates"):
        table.add_column(col)
    for t in tf.targets.values():
        gates = ", ".join(f"{k}={v:g}" for k, v in t.gates.items()) or "-"
        table.add_row(t.name, t.format, t.runtime, t.scheme, t.method, t.hardware, gates)
    _console().print(table)
    from ..config import SIZE_GATES
    from ..hardware import detect

    machine = detect()
    for t in tf.targets.values():
        if not any(g in t.gates for g in SIZE_GATES):
            _console(stderr=True).print(f"warning: target {t.name} has no size gate ({' or '.join(SIZE_GATES)}): an export "
                                        "that left its weights in floating point would pass", markup=False)
        missing = machine.missing(t.hardware_label)
        if missing:
            _console(stderr=True).print(f"note: target {t.name} is built for {t.hardware}; this machine ({machine.label}) "
                                        f"lacks {', '.join(missing)}, so its runtime checks here do not use the "
                                        "deployment's arithmetic", markup=False)


@cli.command("inspect", epilog="Example:  quantprism inspect ./my-llama --targets targets.toml --calibration data.jsonl")
@click.argument("path", required=False, default=None)
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=None,
              help="targets.toml to check applicability against (default: ./targets.toml if present).")
@click.option("--calibration", default=None, help="Also build this calibration set and print its sha256 ('builtin' for the bundled text).")
@click.option("--samples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per calibration window.")
@click.option("--seed", type=int, default=0, show_default=True, help="Calibration sampling seed.")
def inspect_cmd(path: str | None, targets_file: Path | None, calibration: str | None, samples: int,
                seq_len: int, seed: int) -> None:
    """Describe a model: architecture, parameters, shapes, dtypes, tokenizer, and which targets apply.

    PATH is a local Hugging Face directory with safetensors weights (default: the bundled model).
    """
    from .inspect import render_inspect

    if targets_file is None and DEFAULT_TARGETS.is_file():
        targets_file = DEFAULT_TARGETS
    render_inspect(_console(), path, targets_file, calibration, samples, seq_len, seed)


def _load_targets(targets_file: Path, model: str | None):
    from ..pipeline.commands import load_targets

    return load_targets(targets_file, model)


@cli.command("quantize", epilog="Example:  quantprism quantize --targets targets.toml --only vllm-gptq-w4g128 --out build/canonical")
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=DEFAULT_TARGETS, show_default=True)
@click.option("--only", multiple=True, help="Only these targets (repeatable).")
@click.option("--model", default=None, help="Model directory (overrides [defaults].model).")
@click.option("--calibration", default=None, help="Calibration source (overrides [defaults].calibration).")
@click.option("--samples", type=int, default=None, help="Calibration windows (overrides [defaults].samples).")
@click.option("--seq-len", type=int, default=None, help="Tokens per window (overrides [defaults].seq_len).")
@click.option("--fp-inputs", is_flag=True, help="Calibrate every layer on fp inputs instead of the quantized layers before it.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Also copy the canonical results here.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache (default ~/.cache/quantprism/canonical).")
@_run_options
def quantize_cmd(targets_file: Path, only: tuple[str, ...], model: str | None, calibration: str | None,
                 samples: int | None, seq_len: int | None, fp_inputs: bool, out: Path | None, cache_dir: Path | None,
                 device: str, max_memory: str | None, quiet: bool) -> None:
    """Run the canonical stage once for the targets: one calibration pass, every grid they need.

    Results are cached by content (model, calibration, recipe); a re-run is a cache hit, and an
    interrupted run starts again without trusting partial files.
    """
    from rich.table import Table

    from ..model.stream import device_of
    from ..pipeline.commands import quantize

    device_of(device)  # a bad --device or --max-memory is exit 2 before any work
    budget = _memory(max_memory)
    tf, info = _load_targets(targets_file, model)
    with _progress(_console(), quiet):
        q = quantize(tf, info, list(only), calibration, samples, seq_len, sequential=not fp_inputs, out=out,
                     cache_dir=cache_dir, device=device, max_memory=budget)
    if q.run is None:
        click.echo("nothing to quantize for these targets")
        return
    table = Table(title=f"canonical results (calibration {q.run.calibration.sha256[:12]}…)")
    for col in ("recipe", "targets", "transform", "method", "grids", "cache", "path"):
        table.add_column(col)
    for r in q.rows:
        table.add_row(r["recipe"], ", ".join(r["targets"]), r["transform"], r["method"], " ".join(r["grids"]), r["cache"],
                      str(r["path"]))
    _console().print(table)
    for name, p in q.plans.items():
        click.echo(f"mixed precision {name}: {len(p['protected'])} tensors on {p['high_grid']} "
                   f"({p['bits_per_weight']:.3f} bits/weight): {', '.join(p['protected'])}")


@cli.command("eval", epilog="Example:  quantprism eval ~/.cache/quantprism/canonical/3f2a… --grid int4_g128_sym_fp16")
@click.argument("canonical", type=click.Path(path_type=Path))
@click.option("--grid", default=None, help="Grid to evaluate (default: the recipe's first grid).")
@click.option("--model", default=None, help="The original model (default: the one recorded in the result).")
@click.option("--eval-text", default=None, help="Held-out text (default: the bundled evaluation text).")
@click.option("--chunks", type=int, default=None, help="Score only the first N 512-token chunks.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the summary as JSON.")
def eval_cmd(canonical: Path, grid: str | None, model: str | None, eval_text: str | None, chunks: int | None,
             json_out: Path | None) -> None:
    """Compare a canonical result with the original model, teacher-forced on held-out text.

    Prints mean KLD(original‖quantized) with percentiles, top-1 agreement and the PPL ratio
    (llama-perplexity's definitions). Linears use GRID; lm_head/embeddings use it where solved.
    """
    from rich.table import Table

    from ..manifest import write_json_atomic
    from ..pipeline.commands import evaluate_canonical

    gid, s = evaluate_canonical(canonical, grid, model, eval_text, chunks)
    table = Table(title=f"{canonical.name} · {gid} vs original ({s['n_tokens']} tokens)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("kld_mean", "kld_median", "kld_p99", "kld_p99.9", "kld_max", "top1_agreement", "ppl", "ppl_base", "ppl_ratio"):
        table.add_row(k, f"{s[k]:.6g}")
    _console().print(table)
    if json_out:
        write_json_atomic(json_out, {"canonical": str(canonical), "grid": gid, **s})


@cli.command("validate", epilog="Example:  quantprism validate build/llamacpp-cpu-q4km/model.gguf")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--threads", type=int, default=None, help="Runtime threads (default: all cores, at most 8).")
@click.option("--model", default=None, help="The original model: also check tokenization parity against its HF tokenizer.")
@click.option("--eval-text", default=None, help="Text for the parity check (default: the bundled evaluation text).")
@click.option("--strict", is_flag=True, help="Stress-set tokenization mismatches fail too (tokenizer_parity = \"strict\").")
def validate_cmd(artifact: Path, threads: int | None, model: str | None, eval_text: str | None, strict: bool) -> None:
    """Check an artifact's structure and smoke-test it in its own runtime.

    A .gguf file → llama.cpp; a .onnx file (or a directory with model.onnx) → ONNX Runtime; an HF
    checkpoint directory with a quantization_config → vLLM. A malformed, truncated or incomplete artifact
    (e.g. a missing external-data file) is one line on stderr and exit 2.
    """
    from ..pipeline.isolate import call_isolated

    # in a child process: a runtime that aborts natively on a wrong-but-well-formed artifact is one line here
    v = call_isolated("quantprism.pipeline.commands:validate_artifact",
                      {"artifact": str(artifact), "threads": threads, "model": model, "eval_text": eval_text,
                       "parity": "strict" if strict else "eval"}, f"validating {artifact}")
    click.echo(f"{v['artifact']}: {v['facts']}, loads in {v['runtime']} (kernel {v['kernel']}), generated {v['generated']} "
               f"tokens with {v['threads']} threads")
    p = v["tokenizer_parity"]
    if p is None:
        return
    if p["tokenizer"] == "hf":
        click.echo("tokenization parity: the runtime uses the model's HF tokenizer")
        return
    ev, st = p["eval"], p["stress"]
    click.echo(f"tokenization parity: evaluation text {'identical' if ev['equal'] else 'DIFFERS'} ({ev['hf_tokens']} HF tokens), "
               f"stress set {st['equal']}/{st['total']} identical")
    if not ev["equal"]:
        d = ev["first_difference"]
        click.echo(f"  first difference at token {d['position']}: HF {d['hf']} vs runtime {d['runtime']}")
    for e in st["examples"]:
        click.echo(f"  stress {e['text']!r}: HF {e['hf']} vs runtime {e['runtime']}")
    if not p["passed"]:
        raise click.exceptions.Exit(1)


@cli.command("build", epilog="Example:  quantprism build --targets targets.toml --out build/ --only llamacpp-cpu-q4km")
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=DEFAULT_TARGETS, show_default=True)
@click.option("--only", multiple=True, help="Only these targets (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("build"), show_default=True)
@click.option("--skip-bench", is_flag=True, help="Skip the latency benchmarks (latency gates are then skipped).")
@click.option("--model", default=None, help="Model directory (overrides [defaults].model).")
@click.option("--calibration", default=None, help="Calibration source (overrides [defaults].calibration).")
@click.option("--eval-text", default=None, help="Held-out text (overrides [defaults].eval_text).")
@click.option("--eval-chunks", type=int, default=16, show_default=True, help="512-token chunks scored per target.")
@click.option("--threads", type=int, default=None, help="Runtime threads (default: all cores, at most 8).")
@_run_options
def build_cmd(targets_file: Path, only: tuple[str, ...], out: Path, skip_bench: bool, model: str | None,
              calibration: str | None, eval_text: str | None, eval_chunks: int, threads: int | None,
              device: str, max_memory: str | None, quiet: bool) -> None:
    """Build every target: one canonical pass, exports, and per target a smoke test, quality in its own runtime
    against the original model, and a latency benchmark; results.json, report.md and report.html in OUT.

    Exit 0 when every gate holds, 1 when a gate fails or a target fails, 2 on bad input.
    """
    from ..calibration import eval_text_path
    from ..errors import ConfigError
    from ..model.stream import device_of
    from ..pipeline import targets_of
    from ..pipeline.build import BuildSettings, build

    device_of(device)  # a bad --device or --max-memory is exit 2 before any work
    budget = _memory(max_memory)
    tf, info = _load_targets(targets_file, model)
    d = tf.defaults
    targets = targets_of(tf, list(only))
    if eval_chunks < 1:
        raise ConfigError("--eval-chunks must be ≥ 1")
    console = _console()
    s = BuildSettings(out=out, calibration=calibration or d.calibration, samples=d.samples, seq_len=d.seq_len, seed=d.seed,
                      eval_text=eval_text_path(eval_text or d.eval_text), eval_chunks=eval_chunks,
                      threads=threads or min(os.cpu_count() or 1, 8), skip_bench=skip_bench,
                      log=(lambda m: None) if quiet else (lambda m: console.print(f"[dim]·[/dim] {m}", highlight=False)),
                      device=device, max_memory=budget, plan_targets=list(tf.targets.values()), tasks=d.tasks,
                      task_limit=d.task_limit, task_paths=d.task_paths)
    with _progress(console, quiet):
        doc = build(targets, info, s)
    from ..report.render import render_md

    console.print(render_md(doc), markup=False, highlight=False)
    console.print(f"results: {out / 'results.json'} · report: {out / 'report.md'}, {out / 'report.html'}")
    if not doc["passed"]:
        raise click.exceptions.Exit(1)


@cli.command("report", epilog="Examples:\n\n  quantprism report build/results.json --baseline previous/results.json\n\n"
                              "  quantprism report --merge cpu/results.json gpu/results.json --targets targets.toml --out merged/")
@click.argument("results", type=click.Path(path_type=Path), nargs=-1, required=True)
@click.option("--baseline", type=click.Path(path_type=Path), default=None, help="A previous results.json to compare with.")
@click.option("--merge", is_flag=True, help="RESULTS are partial builds (one CI job per hardware label): write one report of all.")
@click.option("--targets", "targets_file", type=click.Path(path_type=Path), default=None,
              help="With --merge: order the targets as this file does.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write report.md/html (default: beside RESULTS; required with --merge).")
def report_cmd(results: tuple[Path, ...], baseline: Path | None, merge: bool, targets_file: Path | None,
               out: Path | None) -> None:
    """Re-render a build's reports, with deltas against a previous build (regressions marked ⚠), and the live shadow
    compares of `quantprism serve` when RESULTS' folder has them (serve/shadow.jsonl). With --merge, several partial
    builds become one results.json + report (exit 1 when a merged target failed its gates, as the build would)."""
    from ..errors import ConfigError
    from ..manifest import write_json_atomic
    from ..report.render import render_md, write_reports
    from ..report.results import load_results as load
    from ..serve.shadow import read_shadow

    base = load(baseline) if baseline else None
    if merge:
        from ..config import parse_targets
        from ..release.merge import merge_results

        if out is None:
            raise ConfigError("--merge needs --out DIR for the merged results.json and reports")
        order = list(parse_targets(targets_file).targets) if targets_file else None
        doc = merge_results([(p, load(p)) for p in results], order)
        write_json_atomic(out / "results.json", doc)
        write_reports(doc, out, base, None)
        _console().print(render_md(doc, base, None), markup=False, highlight=False)
        if not doc["passed"]:
            raise click.exceptions.Exit(1)
        return
    if len(results) != 1:
        raise ConfigError("give one results.json (or several with --merge)")
    doc = load(results[0])
    shadow = read_shadow(results[0].parent / "serve" / "shadow.jsonl")  # live compares, when the build was served
    write_reports(doc, out or results[0].parent, base, shadow)
    _console().print(render_md(doc, base, shadow), markup=False, highlight=False)


from . import release_cmds, serve_cmds  # noqa: E402,F401  (register serve / flag / rollback / hardware … on the group)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # our own bars only: no third-party progress output
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from ..memory import release_freed_memory

    release_freed_memory()  # the streamed pass frees a layer's buffers after each layer: give them back
    terminated = []

    def on_term(signum, frame):  # SIGTERM (CI cancel, `kill`) takes the Ctrl-C path: workers killed, temps removed
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    # over RLIMIT_FSIZE a write fails with EFBIG (one line below) instead of killing us
    previous_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN) if previous is not None else None
    try:
        rv = cli.main(args=argv, prog_name="quantprism", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except QuantprismError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except OSError as e:
        full = disk_full(e, "writing")
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return full.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):  # every artifact and checkpoint is written by rename
        print(f"error: {'terminated' if terminated else 'interrupted'}; run the same command again to resume from what "
              "is finished", file=sys.stderr)
        return 143 if terminated else 130
    except click.ClickException as e:
        print(f"error: {e.format_message()} (see 'quantprism --help')", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGXFSZ, previous_xfsz)


if __name__ == "__main__":
    sys.exit(main())
