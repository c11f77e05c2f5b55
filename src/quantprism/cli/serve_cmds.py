"""`quantprism serve`, `quantprism flag`, `quantprism rollback`: ship a build behind a flag."""
from __future__ import annotations

import os
from pathlib import Path

import click

from . import cli


def _fraction(ctx, param, value):
    if value is not None and not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"{value} is not a fraction between 0 and 1 (e.g. 0.1 for 10 %)")
    return value


@cli.command("serve", epilog="Example:  quantprism serve build/ --candidate llamacpp-cpu-q4km --share 0.1 --shadow 0.05")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--baseline", default="original", show_default=True, help="'original' (the unquantized model) or a target.")
@click.option("--candidate", required=True, help="The target shipped behind the flag.")
@click.option("--share", type=float, default=0.1, show_default=True, callback=_fraction,
              help="Fraction of users routed to the candidate.")
@click.option("--shadow", type=float, default=0.0, show_default=True, callback=_fraction,
              help="Fraction of baseline requests also run on the candidate, off the response path.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--threads", type=int, default=None, help="Threads per arm's runtime (default: cores / 2, at least 1).")
@click.option("--ctx", "n_ctx", type=int, default=1024, show_default=True, help="Context length per arm.")
@click.option("--max-queue", type=int, default=16, show_default=True, help="Requests waiting per arm before 429.")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True, help="Seconds before 504.")
@click.option("--allow-failed", is_flag=True, help="Serve a candidate whose gates failed in results.json.")
def serve_cmd(build_dir: Path, baseline: str, candidate: str, share: float, shadow: float, host: str, port: int,
              threads: int | None, n_ctx: int, max_queue: int, timeout_s: float, allow_failed: bool) -> None:
    """An OpenAI-compatible server for BUILD_DIR (a `quantprism build` output): the baseline and the candidate, each
    in its own runtime process; the flag file BUILD_DIR/serve/flag.json decides who serves whom."""
    import logging

    import uvicorn

    from ..errors import ConfigError
    from ..serve import ServeSettings, open_server

    if max_queue < 0 or timeout_s <= 0 or n_ctx < 16:
        raise ConfigError("--max-queue must be ≥ 0, --timeout > 0 and --ctx ≥ 16")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = ServeSettings(baseline=baseline, candidate=candidate, share=share, shadow=shadow,
                      threads=threads or max(1, (os.cpu_count() or 2) // 2), n_ctx=n_ctx, max_queue=max_queue,
                      timeout_s=timeout_s, allow_failed=allow_failed)
    server = open_server(build_dir, s)
    try:
        uvicorn.run(server.app(), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        for arm in server.arms.values():
            arm.stop()


@cli.command("flag", epilog="Example:  quantprism flag build/ --share 0.25")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--share", type=float, default=None, callback=_fraction, help="The candidate's new share.")
@click.option("--shadow", type=float, default=None, callback=_fraction, help="The new shadow share.")
def flag_cmd(build_dir: Path, share: float | None, shadow: float | None) -> None:
    """Change a served build's routing; the server applies it on the next request (no restart)."""
    from ..serve.flag import set_flag

    st = set_flag(build_dir, share, shadow)
    click.echo(f"flag v{st.version}: {st.candidate} share {st.share:g}, shadow {st.shadow:g} (baseline {st.baseline})")


@cli.command("rollback", epilog="Example:  quantprism rollback build/")
@click.argument("build_dir", type=click.Path(path_type=Path))
def rollback_cmd(build_dir: Path) -> None:
    """Every request to the baseline, shadow off, on the next request (the candidate stays loaded)."""
    from ..serve.flag import rollback

    st = rollback(build_dir)
    click.echo(f"flag v{st.version}: rolled back, every request to {st.baseline}")


@cli.command("deploy", epilog="Example:  quantprism deploy build/ --kserve --candidate llamacpp-cpu-q4km --share 0.1 "
                              "--storage-uri s3://models/quantprism --out deploy/")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--kserve", "kind", flag_value="kserve", help="KServe InferenceService manifests (canary rollout).")
@click.option("--litellm", "kind", flag_value="litellm", help="A LiteLLM router config (weighted, mirrored shadow).")
@click.option("--baseline", default="original", show_default=True)
@click.option("--candidate", required=True)
@click.option("--share", type=float, default=0.1, show_default=True, callback=_fraction)
@click.option("--shadow", type=float, default=0.0, show_default=True, callback=_fraction)
@click.option("--storage-uri", default="pvc://quantprism-artifacts", show_default=True,
              help="KServe: where artifacts are uploaded, each under <storage-uri>/<sha256>.")
@click.option("--endpoint", default="http://127.0.0.1:8000/v1", show_default=True,
              help="LiteLLM: the OpenAI base URL of `quantprism serve` (arms are addressed by name).")
@click.option("--name", default=None, help="Service / model name (default: <model>-<candidate>).")
@click.option("--out", type=click.Path(path_type=Path), required=True)
def deploy_cmd(build_dir: Path, kind: str | None, baseline: str, candidate: str, share: float, shadow: float,
               storage_uri: str, endpoint: str, name: str | None, out: Path) -> None:
    """Fleet manifests for BUILD_DIR: KServe (baseline, candidate as canary, rollback) or LiteLLM (weighted routing
    with a mirrored shadow), artifacts addressed by sha256 (artifacts.json says what to upload where)."""
    from ..errors import ConfigError
    from ..serve.deploy import write_deploy

    if kind is None:
        raise ConfigError("quantprism deploy: choose --kserve or --litellm")
    for p in write_deploy(build_dir, out, kind, baseline, candidate, share, shadow, storage_uri, endpoint, name):
        click.echo(str(p))
