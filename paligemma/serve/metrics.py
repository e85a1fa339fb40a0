"""Prometheus text-format metrics (exposition format 0.0.4), with no client library.

`ServeMetrics` holds what GET /metrics shows: requests by endpoint and status, queue depth, running rows,
prompt and generated tokens, time-to-first-token and per-token latency histograms, and the image
feature cache's hits and misses. Counters and gauges are updated from the engine thread and the event
loop; each update takes a lock.
"""

from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str):
        self.name, self.doc = name, doc
        self.lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()):
        super().__init__(name, doc)
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *label_values: str) -> None:
        with self.lock:
            self.values[label_values] = self.values.get(label_values, 0.0) + amount

    def render(self) -> list[str]:
        lines = self.header()
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.labels, key)} {_num(value)}")
        return lines


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, doc: str):
        super().__init__(name, doc)
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(self.value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        super().__init__(name, doc)
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        with self.lock:
            for i, b in enumerate(self.buckets):
                if value <= b:
                    self.counts[i] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        lines = self.header()
        for b, c in zip(self.buckets, self.counts):
            lines.append(f'{self.name}_bucket{{le="{_num(b)}"}} {c}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {_num(self.sum)}",
                  f"{self.name}_count {self.count}"]
        return lines


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class ServeMetrics:
    def __init__(self):
        p = "paligemma_"
        self.requests = Counter(p + "requests_total", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"))
        self.waiting = Gauge(p + "queue_depth", "Requests waiting for a free batch row.")
        self.running = Gauge(p + "running_rows", "Requests in the running decode batch.")
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens prefilled (image tokens included).")
        self.generated_tokens = Counter(p + "generated_tokens_total", "Tokens generated.")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Seconds from submission to the first token.")
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Seconds between consecutive tokens of a request.")
        self.image_cache_hits = Counter(p + "image_cache_hits_total", "Vision-tower outputs served from the cache.")
        self.image_cache_misses = Counter(p + "image_cache_misses_total", "Images run through the vision tower.")

    def render(self) -> str:
        lines: list[str] = []
        for m in vars(self).values():
            lines += m.render()
        return "\n".join(lines) + "\n"
