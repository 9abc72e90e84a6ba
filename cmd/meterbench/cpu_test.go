package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func writeFile(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "stat")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestProcessTicksSumsUserAndSystem(t *testing.T) {
	// The command name holds a space and a parenthesis, which a split on
	// spaces would miscount.
	path := writeFile(t, "1234 (my (odd) cmd) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 8 0 100 0 0\n")

	assert.Equal(t, int64(325), processTicks(path))
	assert.Equal(t, int64(-1), processTicks(filepath.Join(t.TempDir(), "missing")))
	assert.Equal(t, int64(-1), processTicks(writeFile(t, "1234 (cmd) S 1\n")))
}

func TestMachineBusyTicksSkipsIdleIowaitSteal(t *testing.T) {
	// user nice system idle iowait irq softirq steal guest guest_nice
	path := writeFile(t, "cpu  100 2 30 5000 40 1 7 900 10 0\ncpu0 50 1 15 2500 20 0 3 450 5 0\n")

	assert.Equal(t, int64(100+2+30+1+7), machineBusyTicks(path))
	assert.Equal(t, int64(-1), machineBusyTicks(writeFile(t, "intr 1 2 3\n")))
}

func TestCPUUsageInCores(t *testing.T) {
	start := cpuSnapshot{at: time.Unix(0, 0), server: 100, client: -1, busy: 1000, postgres: map[int]int64{7: 40, 8: 10}}
	// Backend 8 disconnected and backend 9 connected during the window.
	end := cpuSnapshot{at: time.Unix(2, 0), server: 250, client: 50, busy: 1300, postgres: map[int]int64{7: 100, 9: 20}}

	usage := end.usageSince(start)

	assert.InDelta(t, 0.75, usage.Server, 1e-9)
	assert.InDelta(t, -1, usage.Client, 1e-9)
	assert.InDelta(t, 0.4, usage.Postgres, 1e-9)
	assert.InDelta(t, 1.5, usage.Machine, 1e-9)
	assert.Equal(t, "0.75", formatCores(usage.Server))
	assert.Equal(t, "?", formatCores(usage.Client))
}

func TestCPUUsageWithoutBackends(t *testing.T) {
	start := cpuSnapshot{at: time.Unix(0, 0), server: 1, client: 1, busy: 1}
	end := cpuSnapshot{at: time.Unix(1, 0), server: 2, client: 2, busy: 2, postgres: map[int]int64{7: 100}}

	assert.InDelta(t, -1, end.usageSince(start).Postgres, 1e-9)
}
