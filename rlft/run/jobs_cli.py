"""`rlft submit` and `rlft jobs status|logs|stop|list`: the command line of `rlft.jobs`.

`rlft submit CONFIG --address URL` validates CONFIG locally, ships it with the project and runs
`rlft train` (or `rlft sweep` with --sweep) on the cluster; with `--wait` it streams the job's logs and exits
0 iff the job SUCCEEDED (1 if it FAILED or was STOPPED, 124 if `--timeout` ran out first; the job keeps
running). Every `JobsError` (token, connection, refusal) is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import rlft.jobs as jobs
from rlft.config import ConfigError
from rlft.jobs import JobsError
from rlft.run_config import parse_assignments


def _default_address() -> str | None:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or (
        os.environ.get("RAY_ADDRESS") if os.environ.get("RAY_ADDRESS", "").startswith("http") else None
    )


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default=_default_address(),
        help="Jobs API of the cluster, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS)",
    )


def _require_address(args) -> str:
    if not args.address:
        raise JobsError("--address is required (e.g. --address http://127.0.0.1:8265), or set RAY_API_SERVER_ADDRESS")
    return args.address.rstrip("/")


def check_url(address: str) -> None:
    """The Jobs API address must be an http(s) URL with a host, e.g. http://127.0.0.1:8265."""
    from urllib.parse import urlparse

    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"--address {address!r} is not a Jobs API URL; give http://HOST:PORT (the head's dashboard "
                          "port, e.g. --address http://127.0.0.1:8265)")


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobsError(f"--env {item!r} must look like KEY=VALUE")
        out[key] = value
    return out


def _run_submit(args) -> int:
    address = _require_address(args)
    check_url(address)
    from rlft.run.check import check_args

    check_args(args, sweep=args.sweep, where="submit")  # every configuration error before anything is sent
    submission = jobs.submit(
        args.config, address, sweep=args.sweep, overrides=parse_assignments(args.set),
        storage_path=args.storage_path, resume=args.resume, pip=args.pip, env=_parse_env(args.env),
        exclude=args.exclude, include=args.include, submission_id=args.job_id,
    )
    result: dict[str, Any] = {
        "job_id": submission.job_id, "address": address, "command": submission.command,
        "entrypoint": submission.entrypoint, "storage_path": submission.storage_path,
        "package_bytes": submission.package_bytes,
    }
    code = 0
    if args.wait:
        client = jobs.connect(address, jobs.find_token())
        finished = jobs.stream_logs(client, submission.job_id, sys.stderr if args.json else sys.stdout, args.timeout)
        status = jobs.wait_for_status(client, submission.job_id, timeout=30 if finished else 0)
        code = jobs.exit_code(status)
        result["status"] = status
        if code == 124:
            print(f"rlft submit: stopped waiting after {args.timeout}s; job {submission.job_id} is {status} "
                  f"(follow it with `rlft jobs logs {submission.job_id} --follow --address {address}`)", file=sys.stderr)
        else:
            print(f"rlft submit: job {submission.job_id} {status}; results under {submission.storage_path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    elif not args.wait:
        print(submission.job_id)
    return code


def _job_info_dict(info) -> dict[str, Any]:
    keys = ("submission_id", "status", "message", "entrypoint", "start_time", "end_time", "metadata", "driver_exit_code")
    out = {k: getattr(info, k, None) for k in keys}
    out["status"] = str(getattr(out["status"], "value", out["status"]))
    return out


def _run_jobs(args) -> int:
    address = _require_address(args)
    client = jobs.connect(address, jobs.find_token())
    action = args.jobs_action
    try:
        if action == "list":
            listed = [_job_info_dict(j) for j in client.list_jobs() if getattr(j, "submission_id", None)]
            if args.json:
                print(json.dumps({"jobs": listed}))
            else:
                for j in listed:
                    print(f"{j['submission_id']}  {j['status']:<9}  {j['entrypoint']}")
            return 0
        if action == "status":
            info = _job_info_dict(client.get_job_info(args.job_id))
            if args.json:
                print(json.dumps(info))
            else:
                for key, value in info.items():
                    print(f"{key}: {value}")
            return 0
        if action == "logs":
            if args.follow:
                jobs.stream_logs(client, args.job_id, sys.stdout, args.timeout)
            else:
                sys.stdout.write(client.get_job_logs(args.job_id))
            return 0
        if action == "stop":
            stopped = client.stop_job(args.job_id)
            status = jobs.wait_for_status(client, args.job_id, timeout=args.timeout) if args.wait else None
            if args.json:
                print(json.dumps({"job_id": args.job_id, "stop_requested": bool(stopped), "status": status}))
            else:
                print(f"job {args.job_id}: " + ("stop requested" if stopped else "already finished")
                      + (f", now {status}" if status else ""))
            return 0
    except RuntimeError as err:  # e.g. "Job ... does not exist" (HTTP 404)
        raise JobsError(str(err)) from None
    raise JobsError(f"unknown action {action!r}")


def _guard(func):
    """Turns JobsError into a one-line message on stderr and exit status 1."""

    def run(args) -> int:
        try:
            return func(args)
        except JobsError as err:
            print(f"rlft {args.command}: {err}", file=sys.stderr)
            return 1

    return run


def register(subparsers) -> None:
    """Adds `rlft submit` and `rlft jobs {status,logs,stop,list}`."""
    p = subparsers.add_parser(
        "submit", help="run `rlft train`/`rlft sweep` on a Ray cluster as a Ray job",
        description="Validate CONFIG locally, ship it with the project to a Ray cluster and run `rlft train` "
        "(or `rlft sweep` with --sweep) there. The token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
        "~/.ray/auth_token. Results land in the config's run.storage_path (on a multi-node cluster: s3://, "
        "gs:// or a shared file system).",
    )
    p.add_argument("config", help="experiment YAML (any local file; its base: chain travels merged)")
    _add_address(p)
    p.add_argument("--sweep", action="store_true", help="run the config's sweep: grid with `rlft sweep`")
    p.add_argument("--resume", action="store_true", help="continue the interrupted experiment run.name in storage")
    p.add_argument("--storage-path", help="override run.storage_path (s3://..., gs://..., or a shared path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--wait", action="store_true", help="stream the job's logs; exit 0 iff it SUCCEEDED")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: stop waiting after this many seconds (exit 124)")
    p.add_argument("--pip", action="append", default=[], metavar="REQ", help="extra pip requirement for the job (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable of the job (repeatable; no secrets)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATH", help="project path to leave out of the package")
    p.add_argument("--include", action="append", default=[], metavar="PATH", help="extra local file/dir to ship (e.g. your reward module)")
    p.add_argument("--job-id", help="submission id to use (default: rlft-<command>-<config>-<time>-<hex>)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (logs go to stderr)")
    p.set_defaults(func=_guard(_run_submit))

    j = subparsers.add_parser("jobs", help="status, logs, stop or list Ray jobs on a cluster")
    actions = j.add_subparsers(dest="jobs_action", metavar="ACTION")
    for name, help_text in (("status", "show a job's status"), ("logs", "print a job's logs"),
                            ("stop", "stop a job"), ("list", "list submitted jobs")):
        a = actions.add_parser(name, help=help_text)
        if name != "list":
            a.add_argument("job_id", metavar="ID", help="the submission id printed by `rlft submit`")
        _add_address(a)
        a.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        if name == "logs":
            a.add_argument("--follow", action="store_true", help="stream until the job ends")
        if name in ("logs", "stop"):
            a.add_argument("--timeout", type=float, default=None, help="seconds to follow/wait at most")
        if name == "stop":
            a.add_argument("--wait", action="store_true", help="wait until the job has stopped")
        a.set_defaults(func=_guard(_run_jobs))
    j.set_defaults(func=lambda args: j.print_help() or 2)
