package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/metering/metering/internal/server"
)

// The benchmark runs the server in a child process: the same binary started
// with serverCommand. The server's CPU and allocation profiles then contain
// only the server, and its garbage collector does not share a heap with the
// load generator.
//
// The two processes talk in JSON lines. The child writes a controlResponse
// with its gRPC address once it listens, then reads one controlRequest per
// line from its standard input and writes one controlResponse per request.
// When its standard input closes, because the parent closed it or exited,
// the child shuts the server down and exits.
const (
	// serverCommand is the first argument that makes meterbench run the
	// server for its parent process.
	serverCommand = "server"

	// envServerDatabaseURL passes the database URL to the child. It is not
	// a command-line argument, because ps shows those to every user and the
	// URL may contain a password.
	envServerDatabaseURL = "METERBENCH_SERVER_DATABASE_URL"

	// serverStartTimeout bounds the time from starting the child to its
	// first SERVING health status.
	serverStartTimeout = 30 * time.Second

	// controlTimeout bounds each request to the child, which includes a
	// garbage collection and writing a profile.
	controlTimeout = 30 * time.Second

	// serverStopTimeout bounds the child's graceful shutdown before the
	// parent kills it.
	serverStopTimeout = 30 * time.Second

	// serverLogTailLines is how many lines of the server log the parent
	// prints when the run fails.
	serverLogTailLines = 20
)

// Operations of controlRequest.
const (
	opStartProfiles = "start_profiles"
	opStopProfiles  = "stop_profiles"
)

// controlRequest is one command from the parent to the child.
type controlRequest struct {
	Op string `json:"op"`
	// CPUPath and MemPath name the profile files of opStartProfiles. Empty
	// skips that profile.
	CPUPath string `json:"cpu_path,omitempty"`
	MemPath string `json:"mem_path,omitempty"`
}

// controlResponse is the child's first line (with Addr) or its reply to a
// controlRequest (with Error when the request failed).
type controlResponse struct {
	Addr  string `json:"addr,omitempty"`
	Error string `json:"error,omitempty"`
}

// serverProcess is the parent's handle on the child that runs the server.
type serverProcess struct {
	cmd       *exec.Cmd
	stdin     io.WriteCloser
	responses chan controlResponse
	exited    chan struct{}
	waitErr   error
	logPath   string
	addr      string
}

// startServerProcess starts the child with databaseURL and logLevel and
// waits for its gRPC address. The child's log goes to a temporary file,
// which stop removes.
func startServerProcess(ctx context.Context, databaseURL, logLevel string) (*serverProcess, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find the meterbench executable to start the server: %w", err)
	}

	logFile, err := os.CreateTemp("", "meterbench-server-*.log")
	if err != nil {
		return nil, fmt.Errorf("create the server log file: %w", err)
	}
	defer logFile.Close()

	cmd := exec.Command(exe, serverCommand, "-log-level", logLevel)
	cmd.Env = append(os.Environ(), envServerDatabaseURL+"="+databaseURL)
	cmd.Stderr = logFile
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, fmt.Errorf("start the server process: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("start the server process: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the server process %s: %w", exe, err)
	}

	p := &serverProcess{
		cmd:       cmd,
		stdin:     stdin,
		responses: make(chan controlResponse),
		exited:    make(chan struct{}),
		logPath:   logFile.Name(),
	}
	go p.readResponses(stdout)
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()

	first, err := p.response(ctx, serverStartTimeout)
	if err != nil {
		p.stop()
		return nil, fmt.Errorf("wait for the server's address: %w", err)
	}
	p.addr = first.Addr

	return p, nil
}

// readResponses decodes the child's standard output into p.responses until
// it closes or holds something other than a response.
func (p *serverProcess) readResponses(stdout io.Reader) {
	scanner := bufio.NewScanner(stdout)
	for scanner.Scan() {
		var resp controlResponse
		if err := json.Unmarshal(scanner.Bytes(), &resp); err != nil {
			resp = controlResponse{Error: fmt.Sprintf("unexpected output from the server process: %q", scanner.Text())}
		}
		select {
		case p.responses <- resp:
		case <-p.exited:
			return
		}
	}
}

// response returns the child's next line, or an error when the child exits,
// timeout passes or ctx ends first.
func (p *serverProcess) response(ctx context.Context, timeout time.Duration) (controlResponse, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()

	select {
	case resp := <-p.responses:
		if resp.Error != "" {
			return controlResponse{}, errors.New(resp.Error)
		}
		return resp, nil
	case <-p.exited:
		return controlResponse{}, fmt.Errorf("the server process exited (%v); its log is in %s", p.waitErr, p.logPath)
	case <-timer.C:
		return controlResponse{}, fmt.Errorf("no response from the server process within %s; its log is in %s", timeout, p.logPath)
	case <-ctx.Done():
		return controlResponse{}, ctx.Err()
	}
}

// control sends req to the child and waits for its response.
func (p *serverProcess) control(ctx context.Context, req controlRequest) error {
	line, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("encode server request %s: %w", req.Op, err)
	}
	if _, err := p.stdin.Write(append(line, '\n')); err != nil {
		return fmt.Errorf("send %s to the server process: %w", req.Op, err)
	}
	if _, err := p.response(ctx, controlTimeout); err != nil {
		return fmt.Errorf("server process %s: %w", req.Op, err)
	}

	return nil
}

// startProfiles starts the server's CPU profile into cpuPath and remembers
// its allocations so far for the allocation profile into memPath. An empty
// path skips that profile.
func (p *serverProcess) startProfiles(ctx context.Context, cpuPath, memPath string) error {
	return p.control(ctx, controlRequest{Op: opStartProfiles, CPUPath: cpuPath, MemPath: memPath})
}

// stopProfiles stops the CPU profile and writes the allocations made since
// startProfiles.
func (p *serverProcess) stopProfiles(ctx context.Context) error {
	return p.control(ctx, controlRequest{Op: opStopProfiles})
}

// stop closes the child's standard input, which makes it shut down, waits
// up to serverStopTimeout and then kills it. It returns the child's exit
// error, if any.
func (p *serverProcess) stop() error {
	_ = p.stdin.Close()

	timer := time.NewTimer(serverStopTimeout)
	defer timer.Stop()
	select {
	case <-p.exited:
	case <-timer.C:
		_ = p.cmd.Process.Kill()
		<-p.exited
		return fmt.Errorf("the server process did not stop within %s and was killed; its log is in %s", serverStopTimeout, p.logPath)
	}
	if p.waitErr != nil {
		return fmt.Errorf("the server process failed: %w; its log is in %s", p.waitErr, p.logPath)
	}

	return nil
}

// logTail returns up to n last lines of the server log.
func (p *serverProcess) logTail(n int) string {
	data, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(cannot read the server log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}

	return strings.Join(lines, "\n")
}

// removeLog deletes the server log file.
func (p *serverProcess) removeLog() error {
	return os.Remove(p.logPath)
}

// runServerProcess is the child's side: it serves the Metering API with
// server.Run on 127.0.0.1 on a free port until its standard input closes or
// ctx ends, and carries out the profile requests read from stdin.
func runServerProcess(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("meterbench "+serverCommand, flag.ContinueOnError)
	fs.SetOutput(stderr)
	logLevel := fs.String("log-level", defaultServerLogLevel, "log level: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return err
	}
	level, err := parseLogLevel(*logLevel)
	if err != nil {
		return fmt.Errorf("-log-level %q: %w", *logLevel, err)
	}
	logger := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))

	cfg := server.DefaultConfig()
	cfg.DatabaseURL = os.Getenv(envServerDatabaseURL)
	cfg.ListenAddr = "127.0.0.1:0"
	cfg.MetricsAddr = ""
	cfg.LogLevel = *logLevel
	if cfg.DatabaseURL == "" {
		return fmt.Errorf("%s is unset: meterbench starts this command itself, with the URL of its database", envServerDatabaseURL)
	}

	var lc net.ListenConfig
	listener, err := lc.Listen(ctx, "tcp", cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", cfg.ListenAddr, err)
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	runErr := make(chan error, 1)
	go func() { runErr <- server.Run(ctx, cfg, logger, server.WithGRPCListener(listener)) }()

	encoder := json.NewEncoder(stdout)
	if err := encoder.Encode(controlResponse{Addr: listener.Addr().String()}); err != nil {
		cancel()
		return errors.Join(fmt.Errorf("write the address: %w", err), <-runErr)
	}

	requests := make(chan controlRequest)
	go readRequests(stdin, requests)

	var prof profiler
	defer prof.abort()
	for {
		select {
		case req, ok := <-requests:
			if !ok {
				cancel()
				return <-runErr
			}
			var resp controlResponse
			if err := prof.handle(req); err != nil {
				resp.Error = err.Error()
			}
			if err := encoder.Encode(resp); err != nil {
				cancel()
				return errors.Join(fmt.Errorf("write the response to %s: %w", req.Op, err), <-runErr)
			}
		case err := <-runErr:
			if err == nil {
				// ctx ended, as on SIGINT.
				return nil
			}
			return fmt.Errorf("metering server stopped: %w", err)
		}
	}
}

// readRequests decodes JSON lines from r into requests and closes requests
// at the end of r. A line that does not decode becomes a request with an
// unknown operation, which the profiler rejects.
func readRequests(r io.Reader, requests chan<- controlRequest) {
	defer close(requests)

	scanner := bufio.NewScanner(r)
	for scanner.Scan() {
		var req controlRequest
		if err := json.Unmarshal(scanner.Bytes(), &req); err != nil {
			req = controlRequest{Op: fmt.Sprintf("(invalid request %q)", scanner.Text())}
		}
		requests <- req
	}
}
