"""Client configuration: a kubeconfig file, or the pod's service account in a cluster."""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes_asyncio import config
from kubernetes_asyncio.client import ApiClient, Configuration

from agent.config import in_cluster

# The custom resource this project defines.
GROUP = "nodecache.flox.dev"
VERSION = "v1alpha1"
PLURAL = "environmentprewarms"
KIND = "EnvironmentPrewarm"

ENV_ANNOTATION = "flox.dev/environment"
ENABLED_LABEL = "flox.dev/enabled"
FLOX_RUNTIME_CLASS = "flox"
COMPONENT = "flox-node-cache"


class KubeConfigError(RuntimeError):
    pass


def node_name_from_env() -> str:
    """The node name from the downward API (`NODE_NAME`)."""
    name = os.environ.get("NODE_NAME", "").strip()
    if not name:
        raise KubeConfigError("NODE_NAME is not set (expose spec.nodeName via the downward API)")
    return name


async def make_api_client(kubeconfig: str | None) -> ApiClient:
    """An ApiClient from `kubeconfig`, or from the in-cluster service account when None."""
    cfg = Configuration()
    try:
        if kubeconfig:
            await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg,
                                          persist_config=False)
        else:
            config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException as e:
        raise KubeConfigError(f"cannot configure the Kubernetes client: {e}") from e
    return ApiClient(configuration=cfg)


def cli_kubeconfig(explicit: str | None) -> str | None:
    """The kubeconfig a command-line user means: --kubeconfig, else the existing files of
    $KUBECONFIG (merged, as kubectl does), else ~/.kube/config; None means in-cluster."""
    if explicit:
        return explicit
    listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep)
              if p and Path(p).expanduser().is_file()]
    if listed:
        return os.pathsep.join(listed)
    home = Path("~/.kube/config").expanduser()
    if home.is_file():
        return str(home)
    if not in_cluster():
        raise KubeConfigError("no kubeconfig: give --kubeconfig, set $KUBECONFIG or create "
                              "~/.kube/config (or run in a pod with a service account)")
    return None
