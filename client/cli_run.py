"""`instructd serve` and `instructd tuner`: the two long-running processes (the other commands, in cli.py,
talk to a server)."""

from __future__ import annotations

from pathlib import Path

import click
from instructd.server.canary import CanaryMode
from instructd.server.config import ServerConfig
from instructd.tuner.config import OBJECTIVES, STARTS, TRAINERS, TunerConfig

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


_DEFAULTS = ServerConfig.__dataclass_fields__


def _default(name: str):
    return _DEFAULTS[name].default


@click.command()
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Hugging Face model folder to serve (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--host", default=_default("host"), show_default=True,
              help="Interface for gRPC; anything but loopback without TLS is logged as a warning.")
@click.option("--port", default=_default("port"), show_default=True, help="gRPC port.")
@click.option("--metrics-host", default=_default("metrics_host"), show_default=True,
              help="Interface for /metrics (it needs no key: keep it private).")
@click.option("--metrics-port", default=_default("metrics_port"), show_default=True, help="Prometheus /metrics port.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="SQLite database, adapter versions and keys (default: $INSTRUCTD_HOME or ~/.local/share/instructd).")
@click.option("--adapter-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Adapters may be registered only from inside this folder (default: DATA_DIR/incoming).")
@click.option("--tls-cert", type=_FILE, help="PEM certificate chain: serve gRPC over TLS (with --tls-key).")
@click.option("--tls-key", type=_FILE, help="PEM private key of --tls-cert.")
@click.option("--tls-client-ca", type=_FILE, help="Require client certificates signed by this CA (mutual TLS).")
@click.option("--max-model-len", default=_default("max_model_len"), show_default=True, help="Context length in tokens.")
@click.option("--kv-cache-gib", default=_default("kv_cache_gib"), show_default=True,
              help="CPU only: GiB for vLLM's KV cache.")
@click.option("--gpu-memory-utilization", default=_default("gpu_memory_utilization"), show_default=True,
              help="GPU only: share of GPU memory for vLLM.")
@click.option("--max-in-flight", default=_default("max_in_flight"), show_default=True,
              help="Generation requests admitted at once; more are refused (RESOURCE_EXHAUSTED) at once.")
@click.option("--generate-per-second", default=_default("generate_per_second"), show_default=True,
              help="Generation requests per second per application key (bursts of twice that); 0: no limit.")
@click.option("--feedback-per-second", default=_default("feedback_per_second"), show_default=True,
              help="Ratings per second per application key (bursts of twice that); 0: no limit.")
@click.option("--max-request-bytes", default=_default("max_request_bytes"), show_default=True,
              help="Largest request message.")
@click.option("--retention-days", default=_default("retention_days"), show_default=True,
              help="Delete exchanges older than this that no adapter was trained on; 0 keeps them all.")
@click.option("--replica-id", default="", help="This replica's name in its response ids (default: made up once, kept).")
@click.option("--peer", "peers", multiple=True, metavar="ID=HOST:PORT",
              help="Another replica, where ratings of its answers are forwarded (repeatable).")
@click.option("--peer-tls-ca", type=_FILE, help="CA of the peers' TLS certificates (default: peers in clear).")
@click.option("--held-out-share", default=_default("held_out_share"), show_default=True,
              help="Share of rated exchanges held out from training for the tuner's gate (by a hash of their id).")
@click.option("--canary", type=click.Choice([m.name.lower() for m in CanaryMode]),
              default=_default("canary").name.lower(), show_default=True,
              help="A candidate the tuner passes first serves a share of users: auto lets their ratings promote or "
                   "roll it back; manual rolls back on its own, promotes only by `instructd promote`; off promotes at "
                   "once.")
@click.option("--canary-share", default=_default("canary_share"), show_default=True,
              help="Share of users (by a hash of their user id) the canary serves.")
@click.option("--canary-max-users", default=_default("canary_max_users"), show_default=True,
              help="Most distinct users the canary serves.")
@click.option("--canary-max-ratings", default=_default("canary_max_ratings"), show_default=True,
              help="End a canary without a clear call after this many ratings of its answers.")
@click.option("--canary-max-seconds", default=_default("canary_max_seconds"), show_default=True,
              help="End a canary without a clear call after this long.")
@click.option("--canary-promote-at-limit", is_flag=True,
              help="At a limit without a clear call, promote the candidate (default: keep the incumbent).")
@click.option("--tensor-parallel-size", default=1, show_default=True, help="vLLM: GPUs per model (tensor parallel).")
@click.option("--pipeline-parallel-size", default=1, show_default=True, help="vLLM: pipeline stages.")
@click.option("--data-parallel-size", default=1, show_default=True, help="vLLM: engine copies in this server.")
@click.option("--tuner/--no-tuner", default=True, show_default=True,
              help="Also run the background tuner (in its own process) with default settings.")
@click.option("--insecure-no-auth", "no_auth", is_flag=True, hidden=True,
              help="Benchmarks only: accept every call without a key, as an admin.")
@click.option("--no-durable-answers", "fire_and_forget", is_flag=True, hidden=True,
              help="Benchmarks only: answer before the exchange is committed.")
def serve(adapter_dir, data_dir, no_auth, fire_and_forget, peers, **options) -> None:
    """Run the service (gRPC, health, reflection, /metrics) until Ctrl-C or SIGTERM.

    On first start it makes an admin API key, DATA_DIR/admin.key (mode 0600), which the CLI on this machine
    uses by itself; the tuner it starts gets a key of its own.

    \b
    Example:
      instructd serve --port 50051 --no-tuner
      instructd serve --host 0.0.0.0 --tls-cert server.pem --tls-key server-key.pem
      instructd serve --replica-id a --peer b=10.0.0.2:50051 --no-tuner     # one of two replicas
      instructd serve --canary manual --canary-share 0.2   # new versions face 20% of users, you approve them
    """
    import asyncio
    import logging

    from instructd.server.app import serve as run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data_dir = data_dir.resolve() if data_dir else None
    if any("=" not in p for p in peers):
        raise click.BadParameter("--peer takes ID=HOST:PORT")
    options["canary"] = CanaryMode[options["canary"].upper()]
    try:
        config = ServerConfig(data_dir=data_dir, adapter_dir=adapter_dir or (data_dir / "incoming" if data_dir else None),
                              auth=not no_auth, durable_answers=not fire_and_forget,
                              peers=tuple(tuple(p.split("=", 1)) for p in peers), **options)
    except ValueError as error:  # the config's own checks, said as a usage error
        raise click.UsageError(str(error)) from None
    asyncio.run(run(config))


@click.command()
@click.option("--target", default="localhost:50051", show_default=True,
              help="The servers to work for, comma-separated (every replica; the first also runs the gate's suite).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The tuner's own directory: its candidates, downloaded versions, lock (default: "
                   "$INSTRUCTD_HOME/tuner). Never a server's: servers are reached through their API only.")
@click.option("--model", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The base model folder the servers serve (default: the embedded model).")
@click.option("--objective", type=click.Choice(OBJECTIVES), default=TunerConfig.objective, show_default=True,
              help="sft: learn 👍 answers and corrections; kto: also push away from 👎 answers; dpo: prefer each "
                   "correction over the 👎 answer it replaces.")
@click.option("--trainer", type=click.Choice(TRAINERS), default=TunerConfig.trainer, show_default=True,
              help="loop: our short loop (sft, kto); trl: TRL's trainers; auto: the loop on CPU (faster there), "
                   "TRL on GPU and for dpo.")
@click.option("--launcher", default=TunerConfig.launcher,
              help="Train in processes this command starts, e.g. 'accelerate launch --multi_gpu --num_processes 4' "
                   "(TRL's trainers on several GPUs; DeepSpeed or FSDP with --config_file).")
@click.option("--steps", default=TunerConfig.steps, show_default=True, help="Most training steps per run.")
@click.option("--epochs", default=TunerConfig.epochs, show_default=True,
              help="Passes over the run's examples (within --steps).")
@click.option("--learning-rate", default=TunerConfig.learning_rate, show_default=True)
@click.option("--rank", default=TunerConfig.rank, show_default=True, help="LoRA rank of a fresh adapter.")
@click.option("--min-new-ratings", default=TunerConfig.min_new_ratings, show_default=True,
              help="Start a run after this many new ratings (over all replicas).")
@click.option("--period", default=TunerConfig.period_seconds, show_default=True,
              help="Also start a run every PERIOD seconds (0: never).")
@click.option("--start-from", type=click.Choice(STARTS), default=TunerConfig.start_from, show_default=True,
              help="base: each candidate is a fresh adapter trained on all the feedback the serving version learnt "
                   "and the new; serving: the serving adapter trained further on the new feedback alone (faster, "
                   "but stacked adapters drifted on what users did not rate).")
@click.option("--include-older", is_flag=True,
              help="Also learn from every older rating, those of runs rejected as suspected poisoning too.")
@click.option("--blocklist", multiple=True, help="Never train on exchanges containing this phrase (repeatable).")
@click.option("--rehearsal", default=TunerConfig.rehearsal, show_default=True,
              help="Plain prompts of the tuner's own whose base answers each run also trains on, so that what users "
                   "did not rate keeps the base's behaviour (0: feedback alone).")
@click.option("--rehearsal-share", default=TunerConfig.rehearsal_share, show_default=True,
              help="Repeat the rehearsal answers until they are this share of the examples learnt from (0: once "
                   "each), e.g. 0.67 with --steps 150.")
@click.option("--classifier", default="", help="'module:function' returning True for an example to leave out.")
@click.option("--poll-seconds", default=TunerConfig.poll_seconds, show_default=True,
              help="How often to look for requests, new ratings and replicas to bring in step.")
@click.option("--once", is_flag=True, help="Run one tuning cycle now, then exit.")
def tuner(target, work_dir, model, objective, trainer, launcher, steps, epochs, learning_rate, rank, min_new_ratings,
          period, start_from, include_older, blocklist, rehearsal, rehearsal_share, classifier, poll_seconds,
          once) -> None:
    """Run the tuner: it turns new ratings into LoRA candidates, gates them, promotes the winners. It needs a
    tuner key ($INSTRUCTD_API_KEY; `instructd serve` gives the tuner it starts one) and runs anywhere.

    \b
    Example:
      instructd tuner --min-new-ratings 100 --objective kto
      INSTRUCTD_API_KEY=ik_... instructd tuner --target gpu1:50051,gpu2:50051 --work-dir /srv/tuner
      instructd tuner --objective dpo --launcher "accelerate launch --multi_gpu --num_processes 4"
    """
    import logging

    from instructd.server.config import default_cache, default_home
    from instructd.server.model import default_model
    from instructd.tuner.scheduler import run_tuner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = TunerConfig(
            work_dir=work_dir or default_home() / "tuner", model=model or default_model(default_cache()),
            targets=tuple(t.strip() for t in target.split(",") if t.strip()), objective=objective, trainer=trainer,
            launcher=launcher, steps=steps, epochs=epochs, learning_rate=learning_rate, rank=rank, lora_alpha=2 * rank,
            min_new_ratings=min_new_ratings, period_seconds=period, start_from=start_from,
            include_older=include_older, blocklist=tuple(blocklist), rehearsal=rehearsal,
            rehearsal_share=rehearsal_share, poll_seconds=poll_seconds)
    except ValueError as error:  # the config's own checks, said as a usage error
        raise click.UsageError(str(error)) from None
    run_tuner(config, once=once, classifier=classifier)
