"""Prometheus metrics and the periodic log line of the online balancer.

Exposed series (``prometheus-client``, in a private :class:`~prometheus_client.CollectorRegistry`
so several balancers in one process never collide):

=========================================== ======= ==============================================
name                                        type    meaning
=========================================== ======= ==============================================
``eplb_layer_balancedness{layer}``          gauge   mean/max rank load of the layer, last window
``eplb_layer_imbalance_ratio{layer}``       gauge   max/mean - 1 of rank load, last window
``eplb_balancedness``                       gauge   mean over layers of the above
``eplb_imbalance_ratio``                    gauge   mean over layers of the above
``eplb_rebalances_total``                   counter plans accepted (each migrates >= 1 layer)
``eplb_layers_migrated_total``              counter layers committed with a new placement
``eplb_bytes_moved_total``                  counter expert weight bytes sent across ranks (all ranks)
``eplb_migration_seconds``                  histog. per rebalance: first launch to last commit
``eplb_policy_seconds``                     histog. policy compute time per plan (off the step)
``eplb_step_time_seconds{quantile}``        gauge   p50 / p99 of recent step times
``eplb_migration_step_time_seconds{q..}``   gauge   p50 / p99 of recent steps that launched or committed
``eplb_staging_bytes`` / ``_peak``          gauge   staging memory of this rank now / peak
``eplb_steps_total``                        counter steps seen
=========================================== ======= ==============================================
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

__all__ = ["BalancerMetrics"]

_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _pct(xs: Any, q: float) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


class BalancerMetrics:
    """Metrics of one balancer (one rank). ``layer_ids``: model layer ids used as the ``layer`` label.

    Args:
        layer_ids: label of each layer position.
        history: number of recent steps kept for the step-time quantiles.
        registry: a registry to register into (default: a new private one).
    """

    def __init__(self, layer_ids: Sequence[int], *, history: int = 1000, registry: CollectorRegistry | None = None,
                 namespace: str = "eplb") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.layer_ids = [str(int(i)) for i in layer_ids]
        r, ns = self.registry, namespace
        self.g_bal = Gauge(f"{ns}_layer_balancedness", "mean/max rank load of the layer over the last window",
                           ["layer"], registry=r)
        self.g_imb = Gauge(f"{ns}_layer_imbalance_ratio", "max/mean - 1 of rank load of the layer", ["layer"],
                           registry=r)
        self.g_bal_mean = Gauge(f"{ns}_balancedness", "mean over layers of the layer balancedness", registry=r)
        self.g_imb_mean = Gauge(f"{ns}_imbalance_ratio", "mean over layers of the layer imbalance ratio", registry=r)
        self.c_rebal = Counter(f"{ns}_rebalances", "plans accepted (each migrates at least one layer)", registry=r)
        self.c_layers = Counter(f"{ns}_layers_migrated", "layers committed with a new placement", registry=r)
        self.c_bytes = Counter(f"{ns}_bytes_moved", "expert weight bytes sent across ranks (all ranks)", registry=r)
        self.h_mig = Histogram(f"{ns}_migration_seconds", "rebalance duration: first launch to last commit",
                               buckets=_BUCKETS, registry=r)
        self.h_policy = Histogram(f"{ns}_policy_seconds", "policy compute time per plan", buckets=_BUCKETS,
                                  registry=r)
        self.g_step = Gauge(f"{ns}_step_time_seconds", "recent step time quantiles", ["quantile"], registry=r)
        self.g_mstep = Gauge(f"{ns}_migration_step_time_seconds", "recent migration-step time quantiles",
                             ["quantile"], registry=r)
        self.g_stage = Gauge(f"{ns}_staging_bytes", "staging memory of this rank now", registry=r)
        self.g_stage_peak = Gauge(f"{ns}_staging_bytes_peak", "peak staging memory of this rank", registry=r)
        self.c_steps = Counter(f"{ns}_steps", "steps seen by the balancer", registry=r)
        self._times: collections.deque[float] = collections.deque(maxlen=history)
        self._mtimes: collections.deque[float] = collections.deque(maxlen=history)
        for qv, name in ((50.0, "0.5"), (99.0, "0.99")):  # computed when scraped, not every step
            self.g_step.labels(quantile=name).set_function(functools.partial(_pct, self._times, qv))
            self.g_mstep.labels(quantile=name).set_function(functools.partial(_pct, self._mtimes, qv))
        self.balancedness = np.ones(len(self.layer_ids))
        self.imbalance = np.zeros(len(self.layer_ids))
        self.rebalances = 0
        self.layers_migrated = 0
        self.bytes_moved = 0
        self.migration_seconds: list[float] = []
        self._server: Any = None

    # ---------------------------------------------------------------- updates
    def observe_step(self, seconds: float, migrating: bool) -> None:
        """One step's wall time; ``migrating``: the step launched or committed a migration."""
        self.c_steps.inc()
        self._times.append(float(seconds))
        if migrating:
            self._mtimes.append(float(seconds))

    def observe_balance(self, balancedness: np.ndarray, imbalance: np.ndarray) -> None:
        """``[L]`` balancedness and imbalance ratio of each layer (last window)."""
        self.balancedness = np.asarray(balancedness, dtype=np.float64)
        self.imbalance = np.asarray(imbalance, dtype=np.float64)
        for lid, b, i in zip(self.layer_ids, self.balancedness, self.imbalance, strict=True):
            self.g_bal.labels(layer=lid).set(float(b))
            self.g_imb.labels(layer=lid).set(float(i))
        self.g_bal_mean.set(float(self.balancedness.mean()))
        self.g_imb_mean.set(float(self.imbalance.mean()))

    def observe_plan(self, seconds: float) -> None:
        self.h_policy.observe(float(seconds))

    def observe_rebalance(self, num_layers: int, bytes_moved: int) -> None:
        """A plan was accepted: ``num_layers`` layers will migrate, moving ``bytes_moved`` bytes."""
        self.rebalances += 1
        self.c_rebal.inc()
        self.bytes_moved += int(bytes_moved)
        self.c_bytes.inc(int(bytes_moved))

    def observe_commit(self, num_layers: int) -> None:
        self.layers_migrated += int(num_layers)
        self.c_layers.inc(int(num_layers))

    def observe_migration_done(self, seconds: float) -> None:
        self.migration_seconds.append(float(seconds))
        self.h_mig.observe(float(seconds))

    def observe_staging(self, now: int, peak: int) -> None:
        self.g_stage.set(int(now))
        self.g_stage_peak.set(int(peak))

    # ---------------------------------------------------------------- outputs
    def step_time_quantiles(self, migrating: bool | None = None) -> dict[str, float]:
        """``{"p50": s, "p99": s}`` of recent steps (all, or only migration steps)."""
        xs = self._mtimes if migrating else self._times
        if not xs:
            return {"p50": float("nan"), "p99": float("nan")}
        return {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Start an HTTP endpoint (``/metrics``) in a daemon thread (``port`` 0: any free port), bound to
        ``addr`` (default: this host only; pass ``"0.0.0.0"`` to expose it)."""
        if self._server is None:
            self._server = start_http_server(int(port), addr=addr, registry=self.registry)

    @property
    def port(self) -> int | None:
        """The bound port of :meth:`serve`'s server, if started."""
        if self._server is None:
            return None
        srv = self._server[0] if isinstance(self._server, tuple) else self._server
        return int(srv.server_port)

    def close(self) -> None:
        if self._server is not None:
            srv = self._server[0] if isinstance(self._server, tuple) else self._server
            srv.shutdown()
            srv.server_close()
            self._server = None

    def log_line(self, step: int) -> str:
        """One line with the same figures as the exposition (for the periodic log)."""
        q = self.step_time_quantiles()
        m = self.step_time_quantiles(True)
        worst = int(np.argmin(self.balancedness)) if self.balancedness.size else 0
        return (f"eplb step={step} balancedness={self.balancedness.mean():.3f} "
                f"(worst layer {self.layer_ids[worst] if self.layer_ids else '-'}: {self.balancedness.min():.3f}) "
                f"imbalance={self.imbalance.mean():.3f} rebalances={self.rebalances} "
                f"layers_migrated={self.layers_migrated} bytes_moved={self.bytes_moved} "
                f"step_p50={q['p50'] * 1e3:.2f}ms step_p99={q['p99'] * 1e3:.2f}ms "
                f"migration_step_p99={m['p99'] * 1e3:.2f}ms")
