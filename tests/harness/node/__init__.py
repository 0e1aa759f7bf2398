"""Pieces of harness.containerd_node: images it builds itself, and the sweep that tears a node down.

images.py    OCI archives made in Python (the pause image, the kt-probe test image) and
             reading an archive's image config digest
teardown.py  finding and removing what a node leaves on the host (processes, mounts,
             cgroups, the bridge, iptables rules)
pause.go     the sandbox process; probe.go the test image's program (built by
             scripts/build-tools.sh)
"""
