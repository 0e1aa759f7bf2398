// pause: the process of every pod sandbox on harness.containerd_node's node.
//
// It holds the pod's namespaces open, reaps orphaned children when it is PID 1 of a shared
// process namespace, and exits on SIGINT/SIGTERM, like registry.k8s.io/pause (which the test
// machine cannot pull). scripts/build-tools.sh builds it statically; the harness wraps it in
// an OCI image itself. Standard library only: `go build pause.go` needs no module.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
