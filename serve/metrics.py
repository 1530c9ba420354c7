"""What the server reports on ``/metrics`` (Prometheus text) beside BentoML's own request counts
and latencies by route and status: generation requests running (the queue the backend drains),
prompt and generated tokens, finish reasons, time to first token and time per output token,
named as vLLM names them (``polm:`` in place of ``vllm:``), so that dashboards built for
vLLM read polm with the prefix changed.

:class:`ServeMetrics` takes the module that makes the metrics: ``bentoml.metrics`` in the
service (BentoML then serves them on ``/metrics`` with its own, across its worker processes) or
``prometheus_client`` anywhere else. The routes call it for every choice they generate.
"""

from __future__ import annotations

import time

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServeMetrics:
    def __init__(self, maker):
        def make(kind, name, doc, **kw):
            return getattr(maker, kind)(name=name, documentation=doc, **kw)

        self.running = make(
            "Gauge", "polm:num_requests_running", "Generations in flight (each choice counts)"
        )
        self.prompt = make("Counter", "polm:prompt_tokens", "Prompt tokens processed")
        self.generated = make("Counter", "polm:generation_tokens", "Tokens generated")
        self.finished = make(
            "Counter",
            "polm:request_success",
            "Generations finished, by finish reason",
            labelnames=["finished_reason"],
        )
        self.ttft = make(
            "Histogram",
            "polm:time_to_first_token_seconds",
            "Time to the first token",
            buckets=TTFT_BUCKETS,
        )
        self.tpot = make(
            "Histogram",
            "polm:time_per_output_token_seconds",
            "Time per token after the first",
            buckets=TPOT_BUCKETS,
        )

        # speculative decoding, as vLLM names it: acceptance rate = accepted / draft tokens
        self.draft_tokens = make(
            "Counter", "polm:spec_decode_num_draft_tokens", "Tokens a draft model proposed"
        )
        self.accepted_tokens = make(
            "Counter",
            "polm:spec_decode_num_accepted_tokens",
            "Draft tokens the served model accepted",
        )

    def draft(self, proposed: int, accepted: int) -> None:
        self.draft_tokens.inc(proposed)
        self.accepted_tokens.inc(accepted)

    def watch(self, n_prompt: int) -> Watch:
        """One generation: call :meth:`Watch.token` as pieces arrive, :meth:`Watch.end` once."""
        self.running.inc()
        self.prompt.inc(n_prompt)
        return Watch(self)


class Watch:
    def __init__(self, m: ServeMetrics):
        self.m, self.t0, self.first, self.ended = m, time.perf_counter(), None, False

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.m.ttft.observe(self.first - self.t0)

    def end(self, reason: str | None, tokens: int) -> None:
        if self.ended:
            return
        self.ended = True
        self.m.running.dec()
        self.m.generated.inc(tokens)
        self.m.finished.labels(finished_reason=reason or "abort").inc()
        if self.first is not None and tokens > 1:
            self.m.tpot.observe((time.perf_counter() - self.first) / (tokens - 1))
