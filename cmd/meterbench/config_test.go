package main

import (
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestConfigDefaultsValid(t *testing.T) {
	cfg := defaultConfig()

	require.NoError(t, cfg.Validate())
	assert.Equal(t, []int{1, 16, 64}, cfg.Concurrencies)
	assert.Equal(t, []scenarioID{"a", "b", "c", "d", "e"}, cfg.Scenarios)
	assert.Equal(t, 10_000, cfg.Accounts)
}

func TestConfigFromFlagsParsesLists(t *testing.T) {
	cfg, err := configFromFlags([]string{"-concurrency", "4, 2", "-scenarios", "c,a,c", "-duration", "3s", "-accounts", "50"}, io.Discard)

	require.NoError(t, err)
	assert.Equal(t, []int{4, 2}, cfg.Concurrencies)
	assert.Equal(t, []scenarioID{"c", "a"}, cfg.Scenarios)
	assert.Equal(t, 3*time.Second, cfg.Duration)
	assert.Equal(t, 50, cfg.Accounts)
}

func TestConfigFromFlagsRejectsBadLists(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"unknown scenario", []string{"-scenarios", "a,x"}, `unknown scenario "x"`},
		{"floor is not a scenario", []string{"-scenarios", "floor"}, `unknown scenario "floor"`},
		{"empty scenarios", []string{"-scenarios", ","}, "at least one scenario"},
		{"not a number", []string{"-concurrency", "1,many"}, `"many" is not an integer`},
		{"positional argument", []string{"extra"}, "takes only flags"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := configFromFlags(tt.args, io.Discard)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}

func TestConfigValidateNamesEachFlag(t *testing.T) {
	cfg := defaultConfig()
	cfg.Duration = 0
	cfg.Warmup = -time.Second
	cfg.Concurrencies = []int{0, maxConcurrency + 1}
	cfg.Accounts = 0
	cfg.HotLimit = 0
	cfg.RPCTimeout = 0
	cfg.SetupConcurrency = 0
	cfg.ServerLogLevel = "loud"
	cfg.PoolMaxConns = -1

	err := cfg.Validate()

	require.Error(t, err)
	for _, want := range []string{
		"-duration 0s", "-warmup -1s", "-concurrency 0", "-concurrency 1025", "-accounts 0", "-hot-limit 0",
		"-rpc-timeout 0s", "-setup-concurrency 0", `-server-log-level "loud"`, "-pool-max-conns -1",
	} {
		assert.Contains(t, err.Error(), want)
	}
}

func TestProfilePathInsertsCell(t *testing.T) {
	assert.Equal(t, "out/cpu-a-c64.pprof", profilePath("out/cpu.pprof", scenarioSpread, 64))
	assert.Equal(t, "mem-floor-c1", profilePath("mem", scenarioFloor, 1))
	assert.Empty(t, profilePath("", scenarioSpread, 1))
}
