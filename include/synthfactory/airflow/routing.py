"""Where each task runs: CPU stages on the default queue, neural training on GPU workers.

An Airflow task's ``queue``, ``pool`` and ``executor_config`` are fixed when the DAG file is parsed, but
the ``synthesizer`` Param is only known when a run starts. So routing follows the *spec*:

- ``fit`` and ``sample`` go to ``synthesizer.queue`` / ``synthesizer.pool``; unset, that is queue ``gpu``
  and pool ``gpu`` (slots = GPUs) for neural training (kinds ctgan, tvae, copulagan; relational mode with
  the PAR engine or neural child models), else the default queue and ``default_pool``. ``sample`` follows ``fit`` because a model fitted on CUDA is loaded where CUDA is.
- ``privacy`` follows ``fit`` when the membership-inference battery trains shadow models
  (``privacy.mia.attacks`` includes ``shadow``) of a neural synthesizer: the shadow models are the spec's
  synthesizer, so they train where it trains (:func:`stage_gpu_routed`).
- Every other stage stays on the default queue.
- A run whose Param asks for a neural synthesizer on a DAG whose fit task was routed to the CPU queue
  (the spec chose a CPU kind and no queue) fails at once, in its first task, with a message saying
  what to change (:func:`check_runtime_synthesizer`). Running neural training on CPU by accident would
  take hours; a spec that wants it anyway says so with ``synthesizer.queue: default``.
- Under the KubernetesExecutor the GPU tasks also carry an ``executor_config`` whose ``pod_override``
  asks for ``nvidia.com/gpu`` (built only when the ``kubernetes`` client is importable and the executor
  is Kubernetes).

Nothing here imports Airflow at module level (configuration is read through :mod:`.compat` on use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from synthfactory.spec import NEURAL_KINDS, DatasetSpec
from synthfactory.errors import ConfigError

GPU_QUEUE = "gpu"
GPU_POOL = "gpu"
DEFAULT_POOL = "default_pool"
GPU_STAGES = ("fit", "sample")


def stage_gpu_routed(spec: DatasetSpec, stage: str) -> bool:
    """Whether ``stage`` takes the training route: fit and sample always; privacy when its battery trains
    shadow models of a neural synthesizer (any profile's thresholds asking for the shadow attack)."""
    if stage in GPU_STAGES:
        return True
    if stage != "privacy" or not spec.synthesizer.neural:
        return False
    pts = [spec.privacy, *(p.privacy for p in spec.profiles.values() if p.privacy is not None)]
    return any(pt.mia.shadow for pt in pts)


def default_queue() -> str:
    """The CPU queue: Airflow's ``[operators] default_queue`` (``default`` unless configured)."""
    try:
        from synthfactory.airflow.compat import conf

        return conf.get("operators", "default_queue", fallback="default") or "default"
    except Exception:  # pragma: no cover - outside Airflow
        return os.environ.get("AIRFLOW__OPERATORS__DEFAULT_QUEUE", "default")


@dataclass(frozen=True)
class Route:
    queue: str
    pool: str
    gpu: bool
    executor_config: dict[str, Any] = field(default_factory=dict)

    def task_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"queue": self.queue, "pool": self.pool}
        if self.executor_config:
            kw["executor_config"] = self.executor_config
        return kw


def training_route(spec: DatasetSpec, cpu_queue: str | None = None) -> Route:
    """The route of the fit and sample tasks for this spec (see the module docstring)."""
    cpu_queue = cpu_queue or default_queue()
    syn = spec.synthesizer
    neural = syn.neural
    queue = syn.queue or (GPU_QUEUE if neural else cpu_queue)
    pool = syn.pool or (GPU_POOL if neural else DEFAULT_POOL)
    gpu = queue != cpu_queue
    config = kubernetes_executor_config(syn.gpus) if gpu and syn.gpus else {}
    return Route(queue=queue, pool=pool, gpu=gpu, executor_config=config)


class RoutingError(ConfigError, ValueError):
    """A run asks for a synthesizer the DAG's fit task is not routed for."""


def check_runtime_synthesizer(spec: DatasetSpec, requested: str | None, cpu_queue: str | None = None) -> None:
    """Fail fast when the run-time ``synthesizer`` Param is neural but fit was routed to the CPU queue."""
    kind = requested or spec.synthesizer.kind
    if kind not in NEURAL_KINDS:
        return
    route = training_route(spec, cpu_queue)
    if route.gpu or spec.synthesizer.queue:  # on a GPU queue, or the spec chose this queue on purpose
        return
    raise RoutingError(
        f"synthesizer={kind!r} is a neural synthesizer, but this DAG's fit task runs on the CPU queue "
        f"{route.queue!r}: queues are fixed when the DAG is parsed, from the spec's synthesizer.kind="
        f"{spec.synthesizer.kind!r}. Trigger with a CPU synthesizer (gaussian_copula), or route training to "
        f"GPU workers in the spec (synthesizer.queue: {GPU_QUEUE}, synthesizer.pool: {GPU_POOL}; or "
        f"synthesizer.queue: {route.queue} to train on CPU on purpose).")


# -- KubernetesExecutor ---------------------------------------------------------------------------
def gpu_pod_override_spec(gpus: int = 1) -> dict[str, Any]:
    """The pod override, as the plain dict the Kubernetes API takes: the ``base`` container (the task's)
    requests and is limited to ``gpus`` NVIDIA GPUs, and tolerates the usual GPU node taint."""
    return {
        "spec": {
            "containers": [{
                "name": "base",
                "resources": {"requests": {"nvidia.com/gpu": str(gpus)}, "limits": {"nvidia.com/gpu": str(gpus)}},
            }],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        }
    }


def _kubernetes_executor_configured() -> bool:
    try:
        from synthfactory.airflow.compat import conf

        executor = conf.get("core", "executor", fallback="") or ""
    except Exception:  # pragma: no cover
        executor = os.environ.get("AIRFLOW__CORE__EXECUTOR", "")
    return "KubernetesExecutor" in executor


def kubernetes_executor_config(gpus: int = 1, *, force: bool = False) -> dict[str, Any]:
    """``{"pod_override": V1Pod(...)}`` asking for GPUs, or ``{}`` when the executor is not Kubernetes or the
    ``kubernetes`` client is not installed (Celery/Local executors ignore it anyway)."""
    if not (force or _kubernetes_executor_configured()):
        return {}
    try:
        from kubernetes.client import models as k8s
    except ImportError:
        return {}
    d = gpu_pod_override_spec(gpus)
    c = d["spec"]["containers"][0]
    pod = k8s.V1Pod(spec=k8s.V1PodSpec(
        containers=[k8s.V1Container(name=c["name"], resources=k8s.V1ResourceRequirements(**c["resources"]))],
        tolerations=[k8s.V1Toleration(**t) for t in d["spec"]["tolerations"]],
    ))
    return {"pod_override": pod}
