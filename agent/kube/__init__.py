"""Kubernetes integration: watch pods, workloads and EnvironmentPrewarm resources."""

from agent.kube.agent import KubeOptions, run_kubernetes
from agent.kube.types import Job, Prewarmer, Progress

__all__ = ["Job", "KubeOptions", "Prewarmer", "Progress", "run_kubernetes"]
