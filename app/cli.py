"""The ``sparsegpt`` console script: a small dispatcher.

    sparsegpt serve  [--host H] [--port P] [--workers N]   the API (+ embedded Redis and workers)
    sparsegpt worker [--gpu N] [--queue Q] [--loglevel L]  one Celery worker for one GPU
    sparsegpt sweeper [--interval S]                        requeues lost jobs, expires artifacts
    sparsegpt prune  MODEL --sparsity 2:4 ...              the engine alone (worker.engine.cli)
    sparsegpt pull   JOB_ID [DIR] [--server URL]           download, check and unpack a job's model
    sparsegpt plan   MODEL --sparsities 0,0.5,2:4 [--wait] a compression plan on a server (app/plan_client.py)
    sparsegpt users  add NAME [--admin] | token [NAME] | remove NAME | list   API accounts

Each subcommand imports what it runs only when it runs, so ``serve`` never loads torch.
"""

from __future__ import annotations

import argparse
import os
import sys


def _serve(args: argparse.Namespace) -> int:
    if args.allow_dir:  # added to SPARSEGPT_LOCAL_DIRS, for this server and its local workers
        dirs = [d for d in os.environ.get("SPARSEGPT_LOCAL_DIRS", "").split(":") if d.strip()]
        for d in args.allow_dir:
            path = os.path.realpath(os.path.expanduser(d))
            if not os.path.isdir(path):
                print(f"sparsegpt serve: error: --allow-dir {d}: no such directory", file=sys.stderr)
                return 2
            dirs.append(path)
        os.environ["SPARSEGPT_LOCAL_DIRS"] = ":".join(dict.fromkeys(dirs))
    from app.serve import serve

    return serve(
        host=args.host, port=args.port, workers=args.workers, log_level=args.log_level, api_workers=args.api_workers
    )


def _worker(args: argparse.Namespace) -> int:
    if args.gpu is not None:
        # Before anything can touch CUDA (it is only touched inside the task anyway).
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    if args.gpu_memory_gb is not None:
        os.environ["SPARSEGPT_WORKER_GPU_MEMORY_GB"] = str(args.gpu_memory_gb)
    if args.gpu_name is not None:
        os.environ["SPARSEGPT_WORKER_GPU_NAME"] = args.gpu_name
    from worker.celery_app import run_worker

    return run_worker(
        queues=args.queue,
        gpu=args.gpu,
        loglevel=args.loglevel,
        hostname=args.hostname,
        concurrency=args.concurrency,
    )


def _sweeper(args: argparse.Namespace) -> int:
    import logging

    from app.config import get_settings
    from app.sweeper import run_sweeper

    logging.basicConfig(
        level=getattr(logging, args.loglevel.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return run_sweeper(get_settings(), interval_s=args.interval)


def _users(args: argparse.Namespace) -> int:
    from app.users import main as users_main

    return users_main(args)


def build_parser() -> argparse.ArgumentParser:
    # Long on purpose: a flat list of argparse declarations, one block per subcommand.
    parser = argparse.ArgumentParser(
        prog="sparsegpt",
        description="SparseGPT pruning service: API server, GPU workers, and the engine's CLI.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("serve", help="run the API (with embedded Redis and local workers by default)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local worker processes to start (default 1; 0 on a server whose workers run apart)",
    )
    p.add_argument(
        "--api-workers",
        type=int,
        default=None,
        metavar="N",
        help="API processes serving requests (default: one per CPU, at most 8, with PostgreSQL; 1 with SQLite)",
    )
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.add_argument(
        "--allow-dir",
        action="append",
        metavar="DIR",
        default=[],
        help="a directory whose models and text files jobs may name by absolute path (repeatable; "
        "added to SPARSEGPT_LOCAL_DIRS)",
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser("worker", help="run one Celery worker (one per GPU)")
    p.add_argument("--gpu", type=int, default=None, help="GPU index (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument(
        "--queue",
        action="append",
        default=None,
        help="extra queue to consume (repeatable); the shared job queue is always consumed",
    )
    p.add_argument("--loglevel", default="info")
    p.add_argument("--hostname", default=None, help="Celery node name (default sparsegpt-gpuN@host)")
    p.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help="GPU memory to advertise (GB) instead of what nvidia-smi reads; jobs are routed by it",
    )
    p.add_argument("--gpu-name", default=None, help="the GPU name to advertise with --gpu-memory-gb")
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="processes in the pool (default 1: one job at a time per GPU)",
    )
    p.set_defaults(func=_worker)

    p = sub.add_parser("sweeper", help="requeue lost jobs, expire artifacts (one at a time across servers)")
    p.add_argument(
        "--interval", type=float, default=None, help="seconds between rounds (default SPARSEGPT_SWEEP_INTERVAL_S)"
    )
    p.add_argument("--loglevel", default="info")
    p.set_defaults(func=_sweeper)

    sub.add_parser(
        "prune",
        help="prune a model with the engine alone (see `sparsegpt prune --help`)",
        add_help=False,
    )

    from app.client import add_parser as add_pull

    add_pull(sub)

    from app.plan_client import add_parser as add_plan

    add_plan(sub)

    p = sub.add_parser("users", help="manage API accounts")
    usub = p.add_subparsers(dest="users_command", metavar="ACTION")
    usub.required = True
    a = usub.add_parser("add", help="create a user and print its token (once, on the last line)")
    a.add_argument("name")
    a.add_argument("--admin", action="store_true", help="may cancel or delete anyone's jobs")
    t = usub.add_parser(
        "token",
        help="replace a user's token (prints the new one once, on the last line); "
        "without NAME: a token for the single-user mode's local user, the same "
        "owner as the browser's jobs",
    )
    t.add_argument("name", nargs="?")
    r = usub.add_parser("remove", help="remove a user (their jobs stay)")
    r.add_argument("name")
    usub.add_parser("list", help="list users")
    p.set_defaults(func=_users)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "prune":
        # Everything after `prune` belongs to the engine's own parser.
        from worker.engine.cli import main as prune_main

        return int(prune_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
