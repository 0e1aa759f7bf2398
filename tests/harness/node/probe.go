// kt-probe: the one program in the harness's test image (see harness.node.images), so that
// tests/cluster/test_containerd_node.py can check a real node without pulling anything.
//
//	kt-probe STEP...    runs each step in order, exits 1 at the first that fails
//
//	say:TEXT     print TEXT
//	whoami       print "uid=U gid=G rootfs=read-only|writable"
//	alloc:MIB    allocate and touch MIB MiB, 1 MiB at a time (to trip a memory limit)
//	api          GET /version from the API server with the pod's service-account token,
//	             at $KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT; print its gitVersion
//	get:URL      plain HTTP GET; print the status and the body's first line
//	serve:PORT   answer every HTTP request on PORT with "kt-probe on HOSTNAME", forever
//	sleep        wait for SIGTERM/SIGINT, then exit 0
//
// Standard library only: `go build probe.go` needs no module. scripts/build-tools.sh builds it.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const saDir = "/var/run/secrets/kubernetes.io/serviceaccount"

func main() {
	for _, step := range os.Args[1:] {
		name, arg, _ := strings.Cut(step, ":")
		var err error
		switch name {
		case "say":
			fmt.Println(arg)
		case "whoami":
			whoami()
		case "alloc":
			err = alloc(arg)
		case "api":
			err = apiVersion()
		case "get":
			err = get(arg)
		case "serve":
			err = serve(arg)
		case "sleep":
			waitForSignal()
		default:
			err = fmt.Errorf("unknown step %q (see the comment at the top of probe.go)", step)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "kt-probe: %s: %v\n", step, err)
			os.Exit(1)
		}
	}
}

func whoami() {
	rootfs := "writable"
	probe := fmt.Sprintf("/.kt-probe-%d", os.Getpid())
	if f, err := os.Create(probe); err != nil {
		rootfs = "read-only"
	} else {
		f.Close()
		os.Remove(probe)
	}
	fmt.Printf("uid=%d gid=%d rootfs=%s\n", os.Getuid(), os.Getgid(), rootfs)
}

func alloc(arg string) error {
	mib, err := strconv.Atoi(arg)
	if err != nil {
		return err
	}
	var chunks [][]byte
	for i := 0; i < mib; i++ {
		chunk := make([]byte, 1<<20)
		for j := 0; j < len(chunk); j += 4096 {
			chunk[j] = 1 // touch every page, so it is really charged to the cgroup
		}
		chunks = append(chunks, chunk)
	}
	fmt.Printf("allocated %d MiB\n", len(chunks))
	return nil
}

func apiVersion() error {
	token, err := os.ReadFile(saDir + "/token")
	if err != nil {
		return err
	}
	caPEM, err := os.ReadFile(saDir + "/ca.crt")
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("no certificate in %s/ca.crt", saDir)
	}
	host := net.JoinHostPort(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT"))
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	req, err := http.NewRequest("GET", "https://"+host+"/version", nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var version struct {
		GitVersion string `json:"gitVersion"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&version); err != nil {
		return fmt.Errorf("status %s: %w", resp.Status, err)
	}
	fmt.Printf("api %s gitVersion=%s\n", host, version.GitVersion)
	return nil
}

func get(url string) error {
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	line, _ := bufio.NewReader(resp.Body).ReadString('\n')
	fmt.Printf("get %s status=%d body=%s\n", url, resp.StatusCode, strings.TrimSpace(line))
	return nil
}

func serve(port string) error {
	host, _ := os.Hostname()
	handler := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "kt-probe on %s\n", host)
	})
	return http.ListenAndServe(":"+port, handler)
}

func waitForSignal() {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	<-signals
}
