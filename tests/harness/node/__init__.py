"""Pieces of harness.containerd_node: its images, its cluster DNS, and the sweep that tears it down.

images.py    OCI archives made in Python (the pause image, the kt-probe test image) and
             reading an archive's image config digest
dns.py       the cluster DNS: CoreDNS on the bridge address (cluster.local only, no upstream)
teardown.py  finding and removing what a node leaves on the host (processes, mounts,
             cgroups, the bridge, iptables rules)
pause.go     the sandbox process; probe.go the test image's program (built by
             scripts/build-tools.sh)
"""
