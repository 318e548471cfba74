"""Rewards served out of process: a pool of Ray actors (`rlft.rewards.remote`) and an HTTP endpoint (`rlft.rewards.http`)."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest
import torch

from rlft.config import ConfigError
from rlft.rewards.base import RewardError, build_reward, evaluate
from rlft.rewards.http import HTTPReward
from rlft.run_config import check_reward_spec

QUAD = {"type": "quadratic", "center": [1.0, 0.5], "scale": 2.0}


def _x(n: int = 37, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- options, before Ray -------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value,rule", [
    ("workers", 0, "workers must be an integer >= 1"),
    ("batch_size", -1, "batch_size must be an integer >= 0"),
    ("num_gpus", -0.5, "num_gpus must be a number >= 0"),
    ("max_retries", 1.5, "max_retries must be an integer"),
])
def test_pool_options_are_checked_before_ray(key, value, rule):
    spec = {**QUAD, "workers": 2, key: value}
    with pytest.raises(ConfigError, match=rule):
        check_reward_spec(spec)


def test_pool_checks_the_served_rewards_own_keys():
    with pytest.raises(ConfigError, match="reward.centre is not a parameter"):
        check_reward_spec({"type": "quadratic", "centre": [0.0, 0.0], "workers": 2})
    check_reward_spec({**QUAD, "workers": 2, "batch_size": 8, "num_gpus": 0.25})  # valid


# -- the actor pool ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(ray_session):
    reward = build_reward({**QUAD, "workers": 2, "batch_size": 8, "num_cpus": 0.25, "max_retries": 2})
    yield reward
    reward.close()


def test_pool_values_equal_in_process(pool):
    local = build_reward(QUAD)
    x = _x()  # 37 rows: 5 chunks of 8 rows, the last one short
    assert torch.equal(evaluate(pool, x), evaluate(local, x))
    assert evaluate(pool, x).dtype == torch.float64
    assert pool.exact_form == local.exact_form and pool.differentiable


def test_pool_gradient_equals_in_process_autograd(pool):
    """The served reward's backward pass is g_i * grad r(x_i): pinned against autograd of the in-process reward
    with a non-uniform upstream gradient (a flipped sign in `_Served.backward` fails this)."""
    local = build_reward(QUAD)
    weights = torch.linspace(-1.0, 2.0, 37, dtype=torch.float64)
    x1 = _x().requires_grad_(True)
    (weights * pool(x1)).sum().backward()
    x2 = _x().requires_grad_(True)
    (weights * local(x2)).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-12)


def test_pool_raises_the_rewards_own_error(pool):
    with pytest.raises(ValueError, match="center has 2 entries, samples have 3"):
        pool(torch.zeros(4, 3))


def test_dead_actor_is_restarted_and_its_batch_retried(pool):
    """Last of the pool's tests: it kills the pool's actors."""
    import ray

    x = _x(16)
    ray.kill(pool.actors()[0], no_restart=False)  # dies; Ray restarts it, the chunk is resent
    assert torch.equal(pool(x), build_reward(QUAD)(x))
    ray.kill(pool.actors()[1], no_restart=True)  # dies for good: a bounded number of retries, then an error
    with pytest.raises(RewardError, match=r"actor 1 of 2 died 3 times .*max_retries 2"):
        pool(x)


# -- HTTP ----------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """/ok: the quadratic reward; /slow: answers after 2 s; /garbage: not JSON; /short: one value too few;
    /flaky: HTTP 503 on every other request."""

    calls: dict[str, int] = {}

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        x = torch.tensor(body["x"], dtype=torch.float64).reshape(body["shape"])
        n = _Handler.calls[self.path] = _Handler.calls.get(self.path, 0) + 1
        if self.path == "/slow":
            time.sleep(2.0)
        if self.path == "/flaky" and n % 2 == 1:
            self.send_response(503)
            self.end_headers()
            return
        values = build_reward(QUAD)(x).tolist()
        text = {"/garbage": "<html>oops</html>", "/short": json.dumps({"reward": values[:-1]})}.get(
            self.path, json.dumps({"reward": values}))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(text.encode())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_reward_equals_in_process(server):
    reward = build_reward({"type": "http", "url": server + "/ok", "batch_size": 10})
    x = _x(25)
    assert torch.allclose(evaluate(reward, x), build_reward(QUAD)(x), rtol=0, atol=1e-12)
    assert not reward.differentiable


def test_http_retries_a_5xx_with_backoff(server):
    reward = HTTPReward(server + "/flaky", retries=1, backoff_s=0.01)
    x = _x(5)
    assert torch.allclose(reward(x), build_reward(QUAD)(x))
    with pytest.raises(RewardError, match=r"/flaky answered HTTP 503"):
        HTTPReward(server + "/flaky", retries=0)(x)


def test_http_timeout_names_the_endpoint(server):
    reward = HTTPReward(server + "/slow", timeout_s=0.3, retries=1, backoff_s=0.01)
    with pytest.raises(RewardError, match=r"reward endpoint http://127.0.0.1:\d+/slow failed 2 times .*timeout_s 0.3"):
        reward(_x(3))


@pytest.mark.parametrize("path,message", [
    ("/garbage", r"/garbage returned a body that is not JSON .*oops"),
    ("/short", r"/short returned 2 rewards for 3 samples"),
])
def test_http_bad_answers_give_a_clear_error(server, path, message):
    with pytest.raises(RewardError, match=message):
        HTTPReward(server + path, retries=0)(_x(3))


def test_http_unreachable_endpoint(server):
    port = int(server.rsplit(":", 1)[1])
    url = f"http://127.0.0.1:{port}/ok".replace(str(port), "1")  # port 1: nothing listens
    with pytest.raises(RewardError, match=r"reward endpoint http://127.0.0.1:1/ok failed 1 times"):
        HTTPReward(url, retries=0)(_x(2))


def test_http_options_are_checked():
    with pytest.raises(ConfigError):
        check_reward_spec({"type": "http", "url": "http://x", "timeout": 3})
    with pytest.raises(ValueError, match="url must start with http"):
        build_reward({"type": "http", "url": "ftp://x"})


# -- a reward actor killed mid-run ------------------------------------------------------------------------


class DyingReward:
    """The quadratic reward, except that on its `die_at`-th call the actor's process exits (once: a marker file)."""

    def __init__(self, marker: str, die_at: int = 3) -> None:
        self.reward, self.marker, self.die_at, self.calls = build_reward(QUAD), marker, die_at, 0

    def __call__(self, x):
        import os
        from pathlib import Path

        self.calls += 1
        if self.calls == self.die_at and not Path(self.marker).exists():
            Path(self.marker).write_text("died once")
            os._exit(1)  # the actor dies as on an OOM kill; Ray restarts it and the pool resends the chunk
        return self.reward(x)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_reward_actor_mid_run_records_every_iteration_once(ray_session, tmp_path, capsys):
    import yaml

    from rlft import cli

    marker = tmp_path / "died"
    data = {
        "model": {"type": "gmm", "weights": [0.5, 0.5], "means": [[1.5, 1.0], [-1.5, -1.0]], "stds": [0.5, 0.5]},
        "reward": {"type": "tests.rewards.test_remote:DyingReward", "marker": str(marker), "workers": 1,
                   "num_cpus": 0.25, "max_retries": 2},
        "alpha": 1.0, "num_steps": 10, "seed": 3, "learner": {"type": "tests.run.test_runner:LinearLearner"},
        "run": {"iterations": 5, "eval_every": 2, "eval_samples": 200, "checkpoint_every": 2, "loggers": ["csv"],
                "storage_path": str(tmp_path / "results"), "max_concurrent_trials": 1, "max_failures": 0},
    }
    config = tmp_path / "dying.yaml"
    config.write_text(yaml.safe_dump(data))
    code = cli.main(["train", str(config), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    out = json.loads(captured.out)
    assert marker.is_file() and out["status"] == "TERMINATED" and out["iteration"] == 5
    rows = [json.loads(line) for line in open(out["history_path"])]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert out["reward_queries"] == 5 * 64  # counted as in process: the retried chunk is not counted twice
