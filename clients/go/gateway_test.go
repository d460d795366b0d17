package taskgateclient

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The longest the gateway may take to log its address, to exit after SIGTERM, and to log a
// line a test waits for.
const (
	startupLimit = 60 * time.Second
	stopLimit    = 30 * time.Second
	lineLimit    = 30 * time.Second
	// How many of the gateway's last log lines a failure shows.
	keptLines = 200
)

var listening = regexp.MustCompile(`gateway listening address=(\S+)`)

// gateway is the real binary, started on the embedded simulator, on an ephemeral port.
type gateway struct {
	t       *testing.T
	address string
	process *exec.Cmd
	exited  chan struct{}
	// exitErr is the process's end as Wait gave it; read only once exited is closed.
	exitErr error

	mu      sync.Mutex
	lines   []string
	changed chan struct{}
}

// startGateway starts `taskgate serve --simulator` with a RetryInfo delay of 1.5 s, as the
// Python and Node suites do, and extraArgs.
func startGateway(t *testing.T, extraArgs ...string) *gateway {
	t.Helper()
	return serve(t, append([]string{"--simulator", "--retry-delay", "1500ms"}, extraArgs...)...)
}

// serve starts `taskgate serve` with args on an ephemeral port. Once the test is done it checks
// that the gateway exits cleanly on SIGTERM, unless the test has stopped it itself.
func serve(t *testing.T, args ...string) *gateway {
	t.Helper()
	binary := os.Getenv("TASKGATE_TEST_BINARY")
	if binary == "" {
		t.Fatal("TASKGATE_TEST_BINARY is not set: run scripts/go-client, which sets it to target/debug/taskgate")
	}
	if _, err := os.Stat(binary); err != nil {
		t.Fatalf("no taskgate binary at %s (run 'cargo build'): %v", binary, err)
	}
	process := exec.Command(binary, append([]string{"serve", "--listen", "127.0.0.1:0"}, args...)...)
	process.Env = append(os.Environ(), "RUST_LOG=info", "TASKGATE_LOG_FORMAT=text")
	// Killed with the test process, should it die before its cleanups run (a timeout's panic, a
	// SIGKILL): a gateway left behind would hold its port and simulator for nothing. (Linux
	// sends it when the thread that started the gateway ends, which Go's runtime does only for
	// a goroutine that locked its thread and returned.)
	process.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := process.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := process.Start(); err != nil {
		t.Fatalf("starting %s: %v", binary, err)
	}
	g := &gateway{t: t, process: process, exited: make(chan struct{}), changed: make(chan struct{})}
	// stderr (the gateway's log) is read to its end, not just up to the "listening" line: a pipe
	// nobody reads fills up, and then the gateway's log writer blocks.
	go func() {
		scanner := bufio.NewScanner(stderr)
		scanner.Buffer(make([]byte, 64*1024), 1024*1024)
		for scanner.Scan() {
			g.mu.Lock()
			g.lines = append(g.lines, scanner.Text())
			close(g.changed)
			g.changed = make(chan struct{})
			g.mu.Unlock()
		}
		g.exitErr = process.Wait()
		close(g.exited)
	}()
	lines, err := g.linesLogged(listening.MatchString, 1, startupLimit)
	if err != nil {
		_ = process.Process.Kill()
		t.Fatalf("the gateway did not log its listening address: %v", err)
	}
	g.address = listening.FindStringSubmatch(lines[0])[1]
	t.Cleanup(func() {
		select {
		case <-g.exited:
			return
		default:
		}
		if err := g.stop(); err != nil {
			t.Error(err)
		}
	})
	return g
}

// linesLogged gives the logged lines that pass test once there are count of them, or an error
// naming the last lines if there are not within limit.
func (g *gateway) linesLogged(test func(string) bool, count int, limit time.Duration) ([]string, error) {
	giveUp := time.NewTimer(limit)
	defer giveUp.Stop()
	for {
		g.mu.Lock()
		var matching []string
		for _, line := range g.lines {
			if test(line) {
				matching = append(matching, line)
			}
		}
		changed := g.changed
		g.mu.Unlock()
		if len(matching) >= count {
			return matching, nil
		}
		select {
		case <-changed:
		case <-g.exited:
			return nil, fmt.Errorf("the gateway exited (%v) before it logged %d such lines:\n%s", g.exitErr, count, g.log())
		case <-giveUp.C:
			return nil, fmt.Errorf("the gateway did not log %d such lines within %v:\n%s", count, limit, g.log())
		}
	}
}

// waitForLines is linesLogged that fails the test.
func (g *gateway) waitForLines(test func(string) bool, count int) []string {
	g.t.Helper()
	lines, err := g.linesLogged(test, count, lineLimit)
	if err != nil {
		g.t.Fatal(err)
	}
	return lines
}

// stop sends SIGTERM and gives an error unless the gateway exits with 0 within stopLimit.
func (g *gateway) stop() error {
	if err := g.process.Process.Signal(syscall.SIGTERM); err != nil {
		return fmt.Errorf("SIGTERM to the gateway: %v", err)
	}
	select {
	case <-g.exited:
	case <-time.After(stopLimit):
		_ = g.process.Process.Kill()
		return fmt.Errorf("the gateway did not exit within %v of SIGTERM:\n%s", stopLimit, g.log())
	}
	if g.exitErr != nil {
		return fmt.Errorf("the gateway exited with %v:\n%s", g.exitErr, g.log())
	}
	return nil
}

func (g *gateway) log() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	lines := g.lines
	if len(lines) > keptLines {
		lines = lines[len(lines)-keptLines:]
	}
	return strings.Join(lines, "\n")
}

// client is a Client of the gateway, closed when the test ends.
func (g *gateway) client(options Options) *Client {
	g.t.Helper()
	client, err := New(g.address, options)
	if err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { _ = client.Close() })
	return client
}

// layout writes a simulator layout of port 4 alone (AutoCase, OPEN, bin 101337 selected), each
// extraction state (EREQ, ERSO) lasting stepTime, and gives the flags that load it.
func layout(t *testing.T, stepTime string) []string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "layout.toml")
	text := fmt.Sprintf("step_time = %q\n[[port]]\nid = 4\nautocase = true\nmode = \"OPEN\"\nselected_bin = 101337\n", stepTime)
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"--simulator-config", path}
}

// The longest a test waits for the gateway's Log Publisher feed to connect after start, and
// the deadline of every stream and call a test makes: an event that never comes ends the
// stream (and fails the test) within it; and how often a test tries to watch until then.
const (
	feedLimit = 10 * time.Second
	testLimit = 20 * time.Second
	watchPoll = 50 * time.Millisecond
)

// testContext is bounded by testLimit and ends with the test.
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testLimit)
	t.Cleanup(cancel)
	return ctx
}

// openWatch opens a watch once the gateway's Log Publisher feed is connected: just after the
// gateway starts, a watch is refused with LOG_PUBLISHER_UNAVAILABLE until then, which is
// retried every watchPoll for at most feedLimit.
func openWatch(ctx context.Context, t *testing.T, client *Client, portIDs []uint32) *Watch {
	t.Helper()
	giveUp := time.Now().Add(feedLimit)
	for {
		watch, err := client.WatchCaseEvents(ctx, portIDs)
		var failure *Error
		if errors.As(err, &failure) && failure.Reason == "LOG_PUBLISHER_UNAVAILABLE" && time.Now().Before(giveUp) {
			// Shorter than the gateway's RetryInfo delay (1.5 s), which would slow every
			// test down, but no busy loop.
			time.Sleep(watchPoll)
			continue
		}
		if err != nil {
			t.Fatalf("WatchCaseEvents: %v", err)
		}
		t.Cleanup(watch.Close)
		return watch
	}
}

// orphanVariable makes TestAGatewayDiesWithTheTestProcess, in the copy of the test binary it
// runs, start a gateway, print its pid and die at once.
const orphanVariable = "TASKGATE_GO_TEST_ORPHAN"

func TestAGatewayDiesWithTheTestProcess(t *testing.T) {
	if os.Getenv(orphanVariable) != "" {
		g := startGateway(t)
		fmt.Printf("gateway pid %d\n", g.process.Process.Pid)
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
	child := exec.Command(os.Args[0], "-test.run=^TestAGatewayDiesWithTheTestProcess$", "-test.count=1")
	child.Env = append(os.Environ(), orphanVariable+"=1")
	output, err := child.Output()
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) {
		t.Fatalf("the test process that started a gateway did not die (%v):\n%s", err, output)
	}
	match := regexp.MustCompile(`gateway pid (\d+)`).FindSubmatch(output)
	if match == nil {
		t.Fatalf("the test process did not start a gateway:\n%s", output)
	}
	pid, err := strconv.Atoi(string(match[1]))
	if err != nil {
		t.Fatal(err)
	}
	giveUp := time.Now().Add(stopLimit)
	for running(pid) {
		if time.Now().After(giveUp) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			t.Fatalf("the gateway (pid %d) still runs %v after the test process that started it died", pid, stopLimit)
		}
		time.Sleep(watchPoll)
	}
}

// running says whether the process pid runs: it exists and is not a zombie nobody has reaped
// yet (the orphan's new parent may not reap it at once, or at all in a container).
func running(pid int) bool {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command, which is in parentheses and may hold spaces.
	fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
	return len(fields) > 0 && fields[0] != "Z"
}
