"""`rlft submit` and `rlft jobs`: run `rlft train` / `rlft sweep` on a Ray cluster as a Ray job.

Ray 2.60's Jobs API (`ray.job_submission.JobSubmissionClient`, served by the head's dashboard) runs an
entrypoint command on the cluster with a runtime environment. `rlft submit CONFIG --address URL`:

1. reads CONFIG (following its `base:` chain), applies `--set` / `--storage-path` overrides and
   validates the whole experiment locally (as `rlft.run_config.load_experiment` does) — a malformed
   config is rejected before anything is sent;
2. finds the cluster's token (`RAY_AUTH_TOKEN`, then the file `RAY_AUTH_TOKEN_PATH`, then
   `~/.ray/auth_token`, the order Ray itself uses) and sends it as `Authorization: Bearer <token>`;
3. zips the project (without .git, .venv, runs/, caches) plus the merged config as
   `rlft_job/<name>.yaml` into one package — the job's `working_dir`, so the config travels with it;
4. submits `python -m rlft.cli {train|sweep} rlft_job/<name>.yaml` and prints the job id;
5. with `--wait`, streams the job's logs and exits 0 iff the job SUCCEEDED (1 if it FAILED or was
   STOPPED, 124 if `--timeout` ran out first; the job keeps running).

Results land where the config's `run.storage_path` says. On a multi-node cluster that must be a cloud
URI (s3://, gs://) or a file system every node mounts: trials on other nodes write there.

`rlft jobs status|logs|stop|list` query the same API with the same token handling.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import secrets
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml

if TYPE_CHECKING:
    from rlft.config import TaskConfig
    from rlft.run_config import RunConfig, SweepGrid

# -- constants --------------------------------------------------------------------------------------

#: directory inside the job package that holds the submitted (merged, validated) config
JOB_CONFIG_DIR = "rlft_job"
#: directory names never packaged (anywhere in the tree)
EXCLUDED_DIRS = frozenset({
    ".git", ".hg", ".svn", ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".ipynb_checkpoints", "node_modules", ".whl", "mlruns", "wandb",
})
#: directory names never packaged at the project's top level (build outputs, local results)
EXCLUDED_TOP_DIRS = frozenset({"runs", "build", "dist", JOB_CONFIG_DIR})
#: file suffixes never packaged
EXCLUDED_SUFFIXES = (".pyc", ".pyo")
#: Ray refuses working_dir packages above 500 MiB; above this we warn
WARN_PACKAGE_BYTES = 100 * 1024**2
#: a freshly started head refuses jobs until its agent is up ("No available agent"): retries, pause
AGENT_RETRIES, AGENT_RETRY_S = 6, 5.0
#: job states after which nothing changes (ray.job_submission.JobStatus values)
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
#: where users get the token, quoted in every authentication error
TOKEN_HINT = (
    "run `ray get-auth-token` on the head node (KubeRay: read the auth_token key of the cluster's "
    "Secret) and set RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file>"
)


class JobsError(RuntimeError):
    """Submitting or querying a job failed; the message says why and what to do."""


# -- token ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """The cluster token a client presents, and where it was found (for error messages)."""

    value: str = field(repr=False)
    """The token itself (never printed)."""
    source: str
    """Where it came from: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH=<file> or <file>."""


def find_token(environ: dict[str, str] | None = None, home: str | os.PathLike | None = None) -> Token | None:
    """Finds the Ray token as Ray does: RAY_AUTH_TOKEN, then RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token.

    Args:
        environ: the environment to read (default `os.environ`).
        home: the home directory of the default token file (default: the user's).
    Returns:
        The token, or None when no source has one.
    Raises:
        JobsError: RAY_AUTH_TOKEN_PATH names a file that cannot be read or is empty (Ray treats that
            as fatal too, rather than falling back silently).
    """
    env = os.environ if environ is None else environ
    value = env.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return Token(value, "RAY_AUTH_TOKEN")
    path_text = env.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path_text:
        path = Path(path_text).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as err:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={path_text} cannot be read ({err.strerror}); {TOKEN_HINT}") from None
        if not value:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={path_text} is empty; {TOKEN_HINT}")
        return Token(value, f"RAY_AUTH_TOKEN_PATH={path_text}")
    default = Path(home if home is not None else Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        value = default.read_text().strip()
        if value:
            return Token(value, str(default))
    return None


def auth_headers(token: Token | None) -> dict[str, str]:
    """The HTTP headers that authenticate a Jobs API request (none without a token)."""
    return {"Authorization": f"Bearer {token.value}"} if token else {}


# -- connecting -------------------------------------------------------------------------------------


def connect(address: str, token: Token | None):
    """Opens a `JobSubmissionClient` on `address`, turning auth and connection failures into JobsError.

    The client's constructor already sends one authenticated request (GET /api/version), so a missing
    (HTTP 401) or wrong (HTTP 403) token is reported here, before any job is submitted.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers(token))
    except AuthenticationError as err:
        raise JobsError(_auth_message(address, token, str(err))) from None
    except ConnectionError:
        raise JobsError(
            f"cannot reach the Ray Jobs API at {address}: is the cluster up, and is the port forwarded "
            "(`ray dashboard cluster/<cloud>.yaml` or `kubectl port-forward svc/<cluster>-head-svc 8265:8265`)?"
        ) from None


def _auth_message(address: str, token: Token | None, detail: str) -> str:
    """A clear message for Ray's AuthenticationError ("Authentication required" = 401, "failed" = 403)."""
    if detail.startswith("Authentication required") or token is None:
        found = "no token was found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)" if token is None \
            else f"the request carried no valid token (token from {token.source})"
        return f"token missing: the cluster at {address} requires token authentication (HTTP 401) and {found}; {TOKEN_HINT}"
    return (
        f"token invalid: the cluster at {address} rejected the token from {token.source} (HTTP 403); "
        f"{TOKEN_HINT} with the head's token"
    )


# -- packaging --------------------------------------------------------------------------------------


def project_root() -> Path | None:
    """The rlft checkout (the directory holding pyproject.toml above `rlft/`), or None if rlft is installed."""
    import rlft

    root = Path(rlft.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "rlft").is_dir() else None


def _package_sources(root: Path | None) -> list[tuple[Path, str]]:
    """(directory, name inside the package) pairs: the whole checkout, or the installed packages."""
    if root is not None:
        return [(root, "")]
    import rlft

    sources = [(Path(rlft.__file__).resolve().parent, "rlft")]
    try:
        import envs

        sources.append((Path(envs.__file__).resolve().parent, "envs"))
    except ImportError:
        pass
    return sources


def _is_excluded(rel: Path, is_dir: bool, excluded_paths: set[Path]) -> bool:
    name = rel.name
    if is_dir and (name in EXCLUDED_DIRS or name.endswith(".egg-info")):
        return True
    if is_dir and len(rel.parts) == 1 and name in EXCLUDED_TOP_DIRS:
        return True
    if not is_dir and name.endswith(EXCLUDED_SUFFIXES):
        return True
    return rel in excluded_paths


def build_package(
    destination: str | os.PathLike,
    config_name: str,
    config_text: str,
    *,
    root: Path | None = None,
    exclude: Sequence[str] = (),
    include: Sequence[str | os.PathLike] = (),
) -> Path:
    """Writes the job's working_dir package: the project's files plus `rlft_job/<config_name>`.

    The zip is deterministic (sorted entries, fixed timestamps), so an unchanged project and config
    give the same package and Ray reuses its cached upload.

    Args:
        destination: path of the .zip to write.
        config_name: file name of the config inside `rlft_job/` (e.g. `alpha_sweep.yaml`).
        config_text: the merged, validated YAML.
        root: the directory to package (default: the rlft checkout, else the installed rlft/envs packages).
        exclude: extra paths relative to the root to leave out (e.g. large local data).
        include: extra local files or directories to add at the package's top level under their names.
    Returns:
        The path of the written zip.
    """
    destination = Path(destination)
    sources = _package_sources(root if root is not None else project_root())
    excluded_paths = {Path(p) for p in exclude}
    entries: dict[str, Path] = {}
    for base, prefix in sources:
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(base)
            dirnames[:] = sorted(d for d in dirnames if not _is_excluded(rel_dir / d, True, excluded_paths))
            for name in filenames:
                rel = rel_dir / name
                path = Path(dirpath) / name
                if _is_excluded(rel, False, excluded_paths) or not path.is_file() or path == destination:
                    continue
                entries[str(Path(prefix) / rel)] = path
    for item in include:
        item = Path(item).expanduser()
        if not item.exists():
            raise JobsError(f"--include {item} does not exist")
        if item.is_file():
            entries[item.name] = item
            continue
        for dirpath, dirnames, filenames in os.walk(item):
            dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
            for name in filenames:
                path = Path(dirpath) / name
                entries[str(Path(item.name) / path.relative_to(item))] = path
    with zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname in sorted(entries):
            info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (entries[arcname].stat().st_mode & 0o777 | 0o100000) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entries[arcname].read_bytes())
        info = zipfile.ZipInfo(f"{JOB_CONFIG_DIR}/{config_name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o100644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, config_text)
    return destination


# -- submitting -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """What `submit` sent: enough to find the job and its results again."""

    job_id: str
    """The submission id (use it with `rlft jobs status|logs|stop`)."""
    address: str
    """The Jobs API address."""
    command: str
    """`train` or `sweep`."""
    entrypoint: str
    """The command the cluster runs."""
    storage_path: str
    """Where the results are written (the config's `run.storage_path`, as the cluster resolves it)."""
    package_bytes: int
    """Size of the uploaded working_dir package."""


def prepare_config(
    config: str | os.PathLike, overrides: dict[str, Any] | None = None
) -> tuple[str, dict, TaskConfig, RunConfig, SweepGrid]:
    """Loads CONFIG with overrides and validates it completely; builds nothing, sends nothing.

    Returns:
        (yaml_text, merged mapping, task, run, grid): the text that travels with the job is the merged
        mapping *before* path resolution, so a `~` in the storage path resolves on the cluster.
    Raises:
        ConfigError: naming the dotted key, the value and the rule.
    """
    from rlft.config import load_yaml
    from rlft.run_config import apply_overrides, experiment_from_dict

    data = apply_overrides(load_yaml(config), overrides)
    task, run, grid = experiment_from_dict(data)
    header = f"# submitted by `rlft submit` from {os.fspath(config)} (base: chain merged, overrides applied)\n"
    return header + yaml.safe_dump(data, sort_keys=False), data, task, run, grid


def remote_command(command: str, config_relpath: str, resume: bool = False) -> str:
    """The entrypoint the cluster runs (`python -m` so that no console script must be installed)."""
    cmd = f"python -m rlft.cli {command} {config_relpath}"
    return cmd + " --resume" if resume else cmd


def submit(
    config: str | os.PathLike,
    address: str,
    *,
    sweep: bool = False,
    overrides: dict[str, Any] | None = None,
    storage_path: str | None = None,
    resume: bool = False,
    pip: Sequence[str] = (),
    env: dict[str, str] | None = None,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
    submission_id: str | None = None,
    log=None,
) -> Submission:
    """Validates CONFIG locally, packages the project with it and submits `rlft train|sweep` as a Ray job.

    Args:
        config: the experiment YAML (any local file; its `base:` chain is merged into what is sent).
        address: the Jobs API, e.g. http://127.0.0.1:8265 (a port-forwarded head).
        sweep: run `rlft sweep` (the config's `sweep:` grid) instead of `rlft train`.
        overrides: {dotted.key: value} applied before validation (as `--set`).
        storage_path: shorthand for overrides["run.storage_path"].
        resume: pass `--resume` to the remote command (continue an interrupted experiment of the same
            `run.name` in the same storage path).
        pip: extra pip requirements installed in the job's runtime environment.
        env: extra environment variables of the job (visible in the dashboard: no secrets).
        exclude: paths relative to the project root to leave out of the package.
        include: extra local files/directories to ship at the package's top level.
        submission_id: the job id to use (default: rlft-<command>-<config>-<time>-<random>).
        log: a callable for progress lines (default: print to stderr).
    Returns:
        The `Submission`.
    Raises:
        ConfigError: the config is malformed (nothing was sent).
        JobsError: token missing/invalid, cluster unreachable, or submission refused.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    overrides = dict(overrides or {})
    if storage_path is not None:
        overrides["run.storage_path"] = storage_path
    text, data, task, run, grid = prepare_config(config, overrides)
    command = "sweep" if sweep else "train"
    if sweep and not grid:
        raise JobsError(f"--sweep needs a `sweep:` grid in {config} (e.g. `sweep: {{alpha: [0.1, 1.0]}}`); "
                        "without --sweep the config runs as one `rlft train`")
    if not sweep and grid:
        log(f"note: the config's `sweep:` grid ({grid.num_trials} trials) is ignored by `rlft train`; pass --sweep to run it")
    raw_storage = str((data.get("run") or {}).get("storage_path") or _default_storage())
    if not run.is_cloud_storage and not raw_storage.startswith(("/", "~")):
        raise JobsError(
            f"run.storage_path={raw_storage!r} is relative: on the cluster it would resolve inside the job's "
            "temporary working directory and be lost; give an absolute path every node mounts, or s3://..., gs://..."
        )
    token = find_token()
    client = connect(address, token)  # fails here (401/403, unreachable) before anything is uploaded
    nodes = _alive_nodes(address, token)
    if not run.is_cloud_storage and nodes > 1:
        log(f"note: run.storage_path={raw_storage} is a local path and the cluster has {nodes} nodes: unless they "
            "all mount it (one machine, NFS), trials on other nodes cannot share it; use s3://... or gs://...")
    stem = Path(config).stem
    config_relpath = f"{JOB_CONFIG_DIR}/{stem}.yaml"
    entrypoint = remote_command(command, config_relpath, resume)
    runtime_env: dict[str, Any] = {"env_vars": {"PYTHONUNBUFFERED": "1", **(env or {})}}
    if pip:
        runtime_env["pip"] = list(pip)
    job_id = submission_id or "rlft-{}-{}-{}-{}".format(
        command, stem, datetime.datetime.now().strftime("%Y%m%d-%H%M%S"), secrets.token_hex(2)
    )
    with tempfile.TemporaryDirectory(prefix="rlft-submit-") as tmp:
        package = build_package(Path(tmp) / "rlft_job.zip", f"{stem}.yaml", text, exclude=exclude, include=include)
        size = package.stat().st_size
        if size > WARN_PACKAGE_BYTES:
            log(f"warning: the job package is {size / 1024**2:.0f} MiB (Ray's limit: 500 MiB); leave data out with --exclude")
        runtime_env["working_dir"] = str(package)
        metadata = {"rlft_command": command, "rlft_config": stem, "rlft_storage_path": raw_storage}
        for attempt in range(AGENT_RETRIES + 1):
            try:
                job_id = client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                                           metadata=metadata)
                break
            except RuntimeError as err:  # the server refused (e.g. duplicate id, bad runtime_env)
                if "No available agent" in str(err) and attempt < AGENT_RETRIES:  # a head still starting up
                    log(f"the head's job agent is not up yet; retrying in {AGENT_RETRY_S:g}s")
                    time.sleep(AGENT_RETRY_S)
                    continue
                raise JobsError(f"the cluster at {address} refused the job: {err}") from None
    log(f"submitted job {job_id} to {address}: {entrypoint}")
    return Submission(job_id, address, command, entrypoint, raw_storage, size)


def _default_storage() -> str:
    """`RunConfig.storage_path`'s default, unexpanded (`~` resolves on the cluster, not here)."""
    import dataclasses

    from rlft.run_config import RunConfig

    return next(f.default for f in dataclasses.fields(RunConfig) if f.name == "storage_path")


def _alive_nodes(address: str, token: Token | None) -> int:
    """Number of alive nodes (dashboard State API); 0 when it cannot be asked (old server, no permission)."""
    import requests

    try:
        r = requests.get(f"{address}/api/v0/nodes?detail=0", headers=auth_headers(token), timeout=10)
        nodes = r.json()["data"]["result"]["result"]
        return sum(n.get("state") == "ALIVE" for n in nodes)
    except Exception:  # only for a note: never fail a submission over it
        return 0


# -- waiting ------------------------------------------------------------------------------------------


def stream_logs(client, job_id: str, out, timeout: float | None = None) -> bool:
    """Writes the job's log chunks to `out` as they arrive until the job ends.

    Returns:
        True when the stream ended (the job finished), False when `timeout` seconds passed first.
    """

    try:
        import aiohttp  # noqa: F401  (tail_job_logs' websocket; part of ray[default])
    except ImportError:
        return _poll_logs(client, job_id, out, timeout)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout))
    except asyncio.TimeoutError:
        return False
    except RuntimeError as err:  # the websocket broke (head gone?): fall back to polling
        print(f"log stream for {job_id} ended early ({err}); waiting for the job's status", file=sys.stderr)
    return True


def _poll_logs(client, job_id: str, out, timeout: float | None, poll_s: float = 2.0) -> bool:
    """`stream_logs` without a websocket: print what is new in the job's logs every `poll_s` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        out.write(logs[shown:])
        out.flush()
        shown = len(logs)
        if status in TERMINAL_STATES:
            return True
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(poll_s)


def wait_for_status(client, job_id: str, timeout: float | None = None, poll_s: float = 0.5) -> str:
    """Polls the job until it reaches a terminal state (or `timeout`); returns the last status seen."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL_STATES or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def exit_code(status: str) -> int:
    """0 for SUCCEEDED, 1 for FAILED or STOPPED, 124 for a job still running when the wait timed out."""
    if status == "SUCCEEDED":
        return 0
    return 1 if status in TERMINAL_STATES else 124


# -- command line -------------------------------------------------------------------------------------


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


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobsError(f"--env {item!r} must look like KEY=VALUE")
        out[key] = value
    return out


def _run_submit(args) -> int:
    from rlft.run_config import parse_assignments

    address = _require_address(args)
    submission = submit(
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
        client = connect(address, find_token())
        finished = stream_logs(client, submission.job_id, sys.stderr if args.json else sys.stdout, args.timeout)
        status = wait_for_status(client, submission.job_id, timeout=30 if finished else 0)
        code = exit_code(status)
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
    client = connect(address, find_token())
    action = args.jobs_action
    try:
        if action == "list":
            jobs = [_job_info_dict(j) for j in client.list_jobs() if getattr(j, "submission_id", None)]
            if args.json:
                print(json.dumps({"jobs": jobs}))
            else:
                for j in jobs:
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
                stream_logs(client, args.job_id, sys.stdout, args.timeout)
            else:
                sys.stdout.write(client.get_job_logs(args.job_id))
            return 0
        if action == "stop":
            stopped = client.stop_job(args.job_id)
            status = wait_for_status(client, args.job_id, timeout=args.timeout) if args.wait else None
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
