"""Kubernetes integration: watch pods, workloads and EnvironmentPrewarm resources.

Nothing is imported here: kubernetes-asyncio costs about 60 MiB of resident memory, so only an
agent that runs in a cluster loads it (agent.kube.agent); health and status need none of it.
"""
