"""Ray nodes on this machine for `test_cluster.py`, every server on 127.0.0.1.

`ray start` cannot do that: in Ray's cluster mode it replaces a loopback `--node-ip-address` by the
machine's outward address, and its GCS and raylet listen on all interfaces. With cluster mode off
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the way `launch.ray_train.start_local_ray` keeps a local Ray
on loopback) `ray start --address` refuses to add a node, so the nodes are started here with
`ray.cluster_utils.Cluster`, Ray's own several-nodes-on-one-machine helper, which builds each node
as `ray start` does (`ray._private.node.Node`).

    python -m tests.launch.ray_nodes TEMP_DIR GCS_PORT DASHBOARD_PORT

starts a head (1 CPU, the job API at 127.0.0.1:DASHBOARD_PORT), prints "ready", then reads one
command a line from stdin, answering each with one line:
    add      a node of 1 CPU joins; answers its index (the head is 0)
    kill I   SIGKILL to every process of node I (a machine lost); answers "killed"
end of input, or "stop": every node is shut down.
"""

from __future__ import annotations

import os
import sys


def main(temp: str, gcs_port: int, dash_port: int) -> None:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported, below
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray.cluster_utils import Cluster

    ensure_token_if_auth_enabled(None, create_token_if_missing=True)  # as `ray start --head` / ray.init do
    head = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash_port}
    cluster = Cluster(initialize_head=True, head_node_args={"temp_dir": temp, "gcs_server_port": gcs_port, **head})
    nodes = [cluster.head_node]
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            what, *args = line.split()
            if what == "add":
                nodes.append(cluster.add_node(num_cpus=1, temp_dir=temp))
                print(len(nodes) - 1, flush=True)
            elif what == "kill":
                cluster.remove_node(nodes[int(args[0])], allow_graceful=False)
                print("killed", flush=True)
            elif what == "stop":
                break
            else:
                print(f"unknown command {what!r}", flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
