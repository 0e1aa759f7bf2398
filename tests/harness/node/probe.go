// kt-probe: the one program in the harness's test image (see harness.node.images), so that
// tests/cluster (test_containerd_node.py, test_harness.py, test_kueue.py) can check a real node
// without pulling anything.
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
//	env:NAME     print "NAME=VALUE"; fails if NAME is not set
//	cat:PATH     print the file's contents (a newline added if it has none at the end)
//	ls:DIR       print "ls DIR: NAME NAME..." sorted, without names that start with "."
//	             (a configMap or secret volume's ..data links)
//	write:PATH=TEXT  write TEXT to PATH (e.g. the termination message: /dev/termination-log)
//	failonce:PATH    the first time (PATH missing): create PATH and exit 1; then do nothing
//	exit:N       exit with status N at once (the steps after it do not run)
//	review       POST a SelfSubjectReview with the pod's service-account token (as api does);
//	             print "user=USERNAME" as the API server authenticated it
//
// Standard library only: `go build probe.go` needs no module. scripts/build-tools.sh builds it.
package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
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
		case "env":
			err = printEnv(arg)
		case "cat":
			err = cat(arg)
		case "ls":
			err = list(arg)
		case "write":
			err = write(arg)
		case "failonce":
			err = failOnce(arg)
		case "exit":
			err = exit(arg)
		case "review":
			err = review()
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

// apiRequest sends method path (body: JSON or nil) to the API server as the pod's service
// account, through the `kubernetes` Service's address; returns the response and that address.
func apiRequest(method, path string, body []byte) (*http.Response, string, error) {
	token, err := os.ReadFile(saDir + "/token")
	if err != nil {
		return nil, "", err
	}
	caPEM, err := os.ReadFile(saDir + "/ca.crt")
	if err != nil {
		return nil, "", err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, "", fmt.Errorf("no certificate in %s/ca.crt", saDir)
	}
	host := net.JoinHostPort(os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT"))
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
	}
	req, err := http.NewRequest(method, "https://"+host+path, bytes.NewReader(body))
	if err != nil {
		return nil, "", err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(req)
	return resp, host, err
}

func apiVersion() error {
	resp, host, err := apiRequest("GET", "/version", nil)
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

func review() error {
	body := []byte(`{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`)
	resp, _, err := apiRequest("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var reviewed struct {
		Status struct {
			UserInfo struct {
				Username string `json:"username"`
			} `json:"userInfo"`
		} `json:"status"`
	}
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&reviewed); err != nil {
		return fmt.Errorf("status %s: %w", resp.Status, err)
	}
	fmt.Printf("user=%s\n", reviewed.Status.UserInfo.Username)
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

func printEnv(name string) error {
	value, ok := os.LookupEnv(name)
	if !ok {
		return fmt.Errorf("not set")
	}
	fmt.Printf("%s=%s\n", name, value)
	return nil
}

func cat(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	text := string(data)
	if !strings.HasSuffix(text, "\n") {
		text += "\n"
	}
	fmt.Print(text)
	return nil
}

func list(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var names []string
	for _, entry := range entries {
		if !strings.HasPrefix(entry.Name(), ".") {
			names = append(names, entry.Name())
		}
	}
	sort.Strings(names)
	fmt.Printf("ls %s: %s\n", dir, strings.Join(names, " "))
	return nil
}

func write(arg string) error {
	path, text, ok := strings.Cut(arg, "=")
	if !ok {
		return fmt.Errorf("want write:PATH=TEXT")
	}
	return os.WriteFile(path, []byte(text), 0o644)
}

func failOnce(path string) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		return err
	}
	return fmt.Errorf("first attempt: created %s, failing", path)
}

func exit(arg string) error {
	code, err := strconv.Atoi(arg)
	if err != nil {
		return err
	}
	os.Stdout.Sync()
	os.Exit(code)
	return nil
}
