"""What an agent loads before it serves anything: kubernetes-asyncio (about 60 MiB resident)
only in a cluster, so an agent outside one (make run, the loadtest, a plain node) stays small."""

import subprocess
import sys


def test_an_agent_outside_a_cluster_does_not_load_the_kubernetes_client() -> None:
    code = ("import sys, agent.app, agent.cli, agent.serve.health; "
            "print(sorted(m for m in sys.modules if m.startswith('kubernetes_asyncio'))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"loaded at start: {out}"
