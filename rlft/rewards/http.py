"""A reward served by the user's own HTTP endpoint: `reward: {type: http, url: ..., timeout_s, retries}`.

The endpoint receives one POST per chunk of at most `batch_size` samples and answers with one number per
sample. The schema (JSON, UTF-8):

    request   {"x": [[...], ...], "shape": [B, d_1, ...]}     x: the B samples as nested lists (B, *event),
                                                                shape: their shape (B first)
    response  {"reward": [r_0, ..., r_{B-1}]}                  B finite numbers, in the order of x

A timeout, a refused connection or an HTTP 5xx is retried `retries` times with exponential back-off
(`backoff_s`, 2 `backoff_s`, ...); an HTTP 4xx, a body that is not JSON, a missing "reward" key, a list
of the wrong length or a non-finite value is not retried. Either way the error names the endpoint and
what it returned; no value is ever filled in. The reward has no gradient (`differentiable = False`): use it
with learners that only query rewards (the RLlib learners, guidance, evaluation), or serve a
differentiable reward with `workers:` instead (`rlft.rewards.remote`).
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
import torch

from rlft.rewards.base import Reward, RewardError, check_reward_values

#: the request's and the response's keys
X_KEY, SHAPE_KEY, REWARD_KEY = "x", "shape", "reward"
#: characters of a bad response body quoted in an error
QUOTE_CHARS = 200


class HTTPReward(Reward):
    """r(x) scored by POSTing x to `url` (see the module docstring for the JSON schema)."""

    name = "http"
    differentiable = False

    def __init__(
        self, url: str, timeout_s: float = 30.0, retries: int = 2, backoff_s: float = 0.5, batch_size: int = 0,
        headers: dict[str, str] | None = None,
    ) -> None:
        """
        Args:
            url: the endpoint (http:// or https://).
            timeout_s: seconds to wait for one response (> 0).
            retries: extra attempts after a timeout, a refused connection or an HTTP 5xx (>= 0).
            backoff_s: seconds before the first retry, doubled for each next one (>= 0).
            batch_size: samples per request; 0 = the whole batch in one request.
            headers: extra HTTP headers (e.g. an Authorization token).
        """
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https:// (got {url!r})")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 (got {timeout_s})")
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"retries must be an integer >= 0 (got {retries!r})")
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0 (got {backoff_s})")
        if not (isinstance(batch_size, int) and batch_size >= 0):
            raise ValueError(f"batch_size must be an integer >= 0 (got {batch_size!r}); 0 sends the whole batch")
        self.url, self.timeout_s, self.retries, self.backoff_s = url, float(timeout_s), retries, float(backoff_s)
        self.batch_size, self.headers = batch_size, dict(headers or {})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        size = self.batch_size or max(n, 1)
        host = x.detach().cpu()
        values = [self._post(host[a:a + size]) for a in range(0, n, size)]
        out = torch.tensor([v for chunk in values for v in chunk], dtype=x.dtype, device=x.device) if n else x.new_zeros(0)
        return check_reward_values(out, n, f"http {self.url}")

    def _post(self, x: torch.Tensor) -> list[float]:
        """One request for x (b, *event) with retries; the b values."""
        body = json.dumps({X_KEY: x.tolist(), SHAPE_KEY: list(x.shape)}).encode()
        request = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", **self.headers})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    text = response.read().decode("utf-8", errors="replace")
                return self._parse(text, x.shape[0])
            except urllib.error.HTTPError as err:
                if err.code < 500 or attempt == self.retries:
                    detail = err.read().decode("utf-8", errors="replace")[:QUOTE_CHARS]
                    raise RewardError(f"reward endpoint {self.url} answered HTTP {err.code} {err.reason}: {detail!r}") from None
                reason = f"HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                reason = str(getattr(err, "reason", err)) or type(err).__name__
                if attempt == self.retries:
                    raise RewardError(
                        f"reward endpoint {self.url} failed {attempt + 1} times (last: {reason}; timeout_s {self.timeout_s:g}); "
                        "check that the server runs and answers in time, or raise reward.timeout_s / reward.retries"
                    ) from None
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    def _parse(self, text: str, n: int) -> list[float]:
        quote = text[:QUOTE_CHARS]
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise RewardError(f"reward endpoint {self.url} returned a body that is not JSON ({err.msg}): {quote!r}") from None
        values = data.get(REWARD_KEY) if isinstance(data, dict) else None
        if not isinstance(values, list):
            raise RewardError(f"reward endpoint {self.url} must answer {{\"{REWARD_KEY}\": [{n} numbers]}} (got {quote!r})")
        if len(values) != n:
            raise RewardError(f"reward endpoint {self.url} returned {len(values)} rewards for {n} samples")
        bad = [i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise RewardError(f"reward endpoint {self.url} returned {values[bad[0]]!r} at index {bad[0]} "
                              f"({len(bad)} of {n} values are not finite numbers)")
        return [float(v) for v in values]
