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

`rlft jobs status|logs|stop|list` query the same API with the same token handling. The package is built
by `rlft.run.package`, the command line lives in `rlft.run.jobs_cli`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from rlft.config import TaskConfig, load_yaml
from rlft.run.package import JOB_CONFIG_DIR, build_package
from rlft.run_config import RunConfig, SweepGrid, apply_overrides, experiment_from_dict

# -- constants --------------------------------------------------------------------------------------

#: Ray refuses working_dir packages above 500 MiB; above this we warn
WARN_PACKAGE_BYTES = 100 * 1024**2
#: a freshly started head refuses jobs until its agent is up ("No available agent"): retries, pause
#: "try again later" answers (a head whose job agent is still starting) are retried with exponential back-off
#: from AGENT_RETRY_S, doubling to at most AGENT_RETRY_MAX_S per wait, for AGENT_RETRY_TOTAL_S in all
AGENT_RETRY_S, AGENT_RETRY_MAX_S, AGENT_RETRY_TOTAL_S = 1.0, 8.0, 60.0
#: the server's messages that mean "not yet" rather than "no"
RETRY_LATER = ("No available agent", "try again later")
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
        try:
            package = build_package(Path(tmp) / "rlft_job.zip", f"{stem}.yaml", text, exclude=exclude, include=include)
        except FileNotFoundError as err:  # an --include that does not exist
            raise JobsError(str(err)) from None
        size = package.stat().st_size
        if size > WARN_PACKAGE_BYTES:
            log(f"warning: the job package is {size / 1024**2:.0f} MiB (Ray's limit: 500 MiB); leave data out with --exclude")
        runtime_env["working_dir"] = str(package)
        metadata = {"rlft_command": command, "rlft_config": stem, "rlft_storage_path": raw_storage}
        job_id = submit_with_retries(
            lambda: client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                                      metadata=metadata), address, log)
    log(f"submitted job {job_id} to {address}: {entrypoint}")
    return Submission(job_id, address, command, entrypoint, raw_storage, size)


def submit_with_retries(send, address: str, log, sleep=time.sleep, clock=time.monotonic) -> str:
    """`send()` (one submission), retrying the server's "try again later" answers with exponential back-off
    for at most AGENT_RETRY_TOTAL_S seconds and saying so; any other refusal, or the last one, is a JobsError."""
    start, wait = clock(), AGENT_RETRY_S
    while True:
        try:
            return send()
        except RuntimeError as err:  # the server refused (e.g. duplicate id, bad runtime_env, agent not up)
            later = any(s.lower() in str(err).lower() for s in RETRY_LATER)
            spent = clock() - start
            if later and spent + wait <= AGENT_RETRY_TOTAL_S:
                log(f"the cluster at {address} says to try again later (its job agent is starting); retrying in "
                    f"{wait:g}s ({spent:.0f}s of at most {AGENT_RETRY_TOTAL_S:g}s spent)")
                sleep(wait)
                wait = min(2 * wait, AGENT_RETRY_MAX_S)
                continue
            if later:
                raise JobsError(f"the cluster at {address} still had no job agent after {spent:.0f}s of retries "
                                f"({err}); check the head with `ray status` and submit again") from None
            raise JobsError(f"the cluster at {address} refused the job: {err}") from None


def _default_storage() -> str:
    """`RunConfig.storage_path`'s default, unexpanded (`~` resolves on the cluster, not here)."""
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
