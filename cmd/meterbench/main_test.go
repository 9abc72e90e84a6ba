package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestMain lets the test binary play the server process: runBench starts
// os.Executable with serverCommand, which is the test binary in tests.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == serverCommand {
		logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
		if err := runServerProcess(context.Background(), os.Args[2:], os.Stdin, os.Stdout, os.Stderr); err != nil {
			logger.Error("server process failed", "error", err)
			os.Exit(1)
		}
		os.Exit(0)
	}

	os.Exit(m.Run())
}

func TestRunBenchAllScenariosPass(t *testing.T) {
	if testing.Short() {
		t.Skip("starts PostgreSQL and a server process")
	}

	cfg := defaultConfig()
	cfg.Duration = 300 * time.Millisecond
	cfg.Warmup = 100 * time.Millisecond
	cfg.Concurrencies = []int{1, 3}
	cfg.Accounts = 20
	cfg.HotLimit = 5
	cfg.ServerLogLevel = "warn"
	cfg.CPUProfile = t.TempDir() + "/cpu.pprof"
	cfg.MemProfile = t.TempDir() + "/mem.pprof"
	cfg.JSONPath = t.TempDir() + "/results.json"
	require.NoError(t, cfg.Validate())

	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	err := runBench(ctx, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), &out, io.Discard)
	require.NoError(t, err, out.String())

	text := out.String()
	assert.Contains(t, text, "synchronous_commit=on")
	assert.Contains(t, text, "all checks passed")
	assert.Contains(t, text, "5 granted of limit 5")
	for _, id := range []scenarioID{scenarioFloor, scenarioSpread, scenarioHot, scenarioAtLimit, scenarioRecord, scenarioRead} {
		assert.Contains(t, text, id.title(cfg))
		for _, n := range cfg.Concurrencies {
			assert.FileExists(t, profilePath(cfg.CPUProfile, id, n))
			assert.FileExists(t, profilePath(cfg.MemProfile, id, n))
		}
	}
	assert.FileExists(t, cfg.JSONPath)
}
