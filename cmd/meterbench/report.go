package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// report is everything a run prints, also written as JSON with -json.
type report struct {
	Machine  machine          `json:"machine"`
	Database databaseSettings `json:"database"`
	Config   Config           `json:"config"`
	Cells    []cellResult     `json:"cells"`
}

// machine describes where the run happened.
type machine struct {
	CPUModel   string `json:"cpu_model"`
	CPUs       int    `json:"cpus"`
	GOMAXPROCS int    `json:"gomaxprocs"`
	OS         string `json:"os"`
	Arch       string `json:"arch"`
	GoVersion  string `json:"go_version"`
}

// readMachine returns the machine's description. The CPU model comes from
// /proc/cpuinfo, so it is "unknown" outside Linux.
func readMachine() machine {
	return machine{
		CPUModel:   readCPUModel("/proc/cpuinfo"),
		CPUs:       runtime.NumCPU(),
		GOMAXPROCS: runtime.GOMAXPROCS(0),
		OS:         runtime.GOOS,
		Arch:       runtime.GOARCH,
		GoVersion:  runtime.Version(),
	}
}

// readCPUModel returns the first "model name" of a /proc/cpuinfo file.
func readCPUModel(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return "unknown"
	}
	defer f.Close()

	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		key, value, ok := strings.Cut(scanner.Text(), ":")
		if ok && strings.TrimSpace(key) == "model name" {
			return strings.TrimSpace(value)
		}
	}

	return "unknown"
}

// printHeader prints the machine, the database settings and the run's
// parameters.
func printHeader(out io.Writer, rep report) {
	m, db, cfg := rep.Machine, rep.Database, rep.Config

	pool := "pgxpool default, max(4, CPUs)"
	if cfg.PoolMaxConns > 0 {
		pool = fmt.Sprintf("%d", cfg.PoolMaxConns)
	}
	keys := "on"
	if !cfg.IdempotencyKeys {
		keys = "off"
	}
	concurrencies := make([]string, len(cfg.Concurrencies))
	for i, n := range cfg.Concurrencies {
		concurrencies[i] = fmt.Sprint(n)
	}

	fmt.Fprintf(out, "machine:    %s, %d CPUs, GOMAXPROCS %d, %s/%s, %s\n", m.CPUModel, m.CPUs, m.GOMAXPROCS, m.OS, m.Arch, m.GoVersion)
	fmt.Fprintf(out, "postgresql: %s, synchronous_commit=%s, fsync=%s, wal_sync_method=%s, max_connections=%s\n",
		db.ServerVersion, db.SynchronousCommit, db.Fsync, db.WALSyncMethod, db.MaxConnections)
	fmt.Fprintf(out, "server:     in a child process on 127.0.0.1, log level %s, database pool %s\n", cfg.ServerLogLevel, pool)
	fmt.Fprintf(out, "run:        %s per cell after %s of warm-up, concurrency %s, %d accounts, idempotency keys %s\n",
		cfg.Duration, cfg.Warmup, strings.Join(concurrencies, ","), cfg.Accounts, keys)
	fmt.Fprintln(out, "columns:    RPCs/s counts every RPC that completed in the window, rejected ones included;")
	fmt.Fprintln(out, "            percentiles are exact (nearest rank over every sample); CPU is cores busy in the")
	fmt.Fprintln(out, "            server process, in meterbench (the client), in the PostgreSQL backends of the")
	fmt.Fprintln(out, "            benchmark database and on the whole machine, other processes included")
	fmt.Fprintln(out)
}

// printTables prints one table per scenario, the floor first, with one row
// per concurrency and, for scenarios of two RPCs, one more row per RPC. A
// scenario without cells, as after an interrupted run, is left out.
func printTables(out io.Writer, cfg Config, cells []cellResult) {
	for _, id := range append([]scenarioID{scenarioFloor}, cfg.Scenarios...) {
		if !slices.ContainsFunc(cells, func(c cellResult) bool { return c.Scenario == id }) {
			continue
		}
		fmt.Fprintln(out, id.title(cfg))
		if len(id.methods()) > 1 {
			fmt.Fprintln(out, "RPCs/s and the ratio to the floor count both RPCs of each pair; latencies are per RPC.")
		}

		tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "conc\trpc\tRPCs/s\tvs floor\tp50\tp99\tp99.9\tCPU srv/cli/pg/all\terrors\t")
		for _, cell := range cells {
			if cell.Scenario != id {
				continue
			}
			cpu := strings.Join([]string{
				formatCores(cell.CPU.Server), formatCores(cell.CPU.Client),
				formatCores(cell.CPU.Postgres), formatCores(cell.CPU.Machine),
			}, "/")
			printRow(tw, cell.Concurrency, cell.All, fmt.Sprintf("%.2fx", cell.RatioToFloor), cpu)
			for _, m := range cell.Methods {
				printRow(tw, cell.Concurrency, m, "", "")
			}
		}
		_ = tw.Flush()
		fmt.Fprintln(out)
	}
}

func printRow(w io.Writer, concurrency int, s rpcStats, ratio, cpu string) {
	p50, p99, p999 := "-", "-", "-"
	if s.RPCs > 0 {
		p50, p99, p999 = formatLatency(s.P50), formatLatency(s.P99), formatLatency(s.P999)
	}
	fmt.Fprintf(w, "%d\t%s\t%.0f\t%s\t%s\t%s\t%s\t%s\t%s\t\n",
		concurrency, s.Name, s.RPCsPerSecond, ratio, p50, p99, p999, cpu, formatErrors(s.Errors))
}

// formatLatency prints d in milliseconds with at least three significant
// digits.
func formatLatency(d time.Duration) string {
	ms := float64(d) / float64(time.Millisecond)
	switch {
	case ms < 10:
		return fmt.Sprintf("%.3fms", ms)
	case ms < 100:
		return fmt.Sprintf("%.2fms", ms)
	}

	return fmt.Sprintf("%.1fms", ms)
}

func formatErrors(errors map[string]int64) string {
	if len(errors) == 0 {
		return "-"
	}
	var parts []string
	for _, code := range sortedKeys(errors) {
		parts = append(parts, fmt.Sprintf("%s=%d", code, errors[code]))
	}

	return strings.Join(parts, " ")
}

// printChecks prints every check of every cell and reports whether all
// passed.
func printChecks(out io.Writer, cells []cellResult) bool {
	fmt.Fprintln(out, "checks after each cell")
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\tconc\tcheck\tresult\tdetail")

	passed := true
	for _, cell := range cells {
		for _, c := range cell.Checks {
			result := "ok"
			if !c.OK {
				result = "FAILED"
				passed = false
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", cell.Scenario, cell.Concurrency, c.Name, result, c.Detail)
		}
	}
	_ = tw.Flush()

	if passed {
		fmt.Fprintln(out, "all checks passed")
	} else {
		fmt.Fprintln(out, "SOME CHECKS FAILED")
	}

	return passed
}

// writeJSON writes rep to path as indented JSON.
func writeJSON(path string, rep report) error {
	data, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return fmt.Errorf("encode results: %w", err)
	}
	if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("write results: %w", err)
	}

	return nil
}
