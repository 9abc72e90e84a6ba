package main

import (
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/google/pprof/profile"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// allocationSink keeps allocateForProfileTest's memory reachable, so that
// the compiler cannot drop the allocations.
var allocationSink [][]byte

//go:noinline
func allocateForProfileTest() {
	for range 64 {
		allocationSink = append(allocationSink, make([]byte, 256<<10))
	}
}

func TestProfilerWritesAllocationsOfInterval(t *testing.T) {
	// Record every allocation. At the default rate of one sample per 512 KiB,
	// the sampled estimate missed the 4 MiB tolerance in 6 runs of 100.
	defer func(rate int) { runtime.MemProfileRate = rate }(runtime.MemProfileRate)
	runtime.MemProfileRate = 1

	dir := t.TempDir()
	cpuPath, memPath := filepath.Join(dir, "cpu.pprof"), filepath.Join(dir, "mem.pprof")
	allocateForProfileTest() // before the interval: must not count
	var p profiler

	require.NoError(t, p.handle(controlRequest{Op: opStartProfiles, CPUPath: cpuPath, MemPath: memPath}))
	require.Error(t, p.handle(controlRequest{Op: opStartProfiles}), "a second start must fail")
	allocateForProfileTest()
	require.NoError(t, p.handle(controlRequest{Op: opStopProfiles}))
	allocationSink = nil

	f, err := os.Open(memPath)
	require.NoError(t, err)
	defer f.Close()
	mem, err := profile.Parse(f)
	require.NoError(t, err)
	assert.Equal(t, "alloc_space", mem.DefaultSampleType)

	spaceIndex := -1
	for i, st := range mem.SampleType {
		if st.Type == "alloc_space" {
			spaceIndex = i
		}
	}
	require.GreaterOrEqual(t, spaceIndex, 0)
	var allocated int64
	for _, s := range mem.Sample {
		for _, loc := range s.Location {
			for _, line := range loc.Line {
				if strings.HasSuffix(line.Function.Name, ".allocateForProfileTest") {
					allocated += s.Value[spaceIndex]
				}
			}
		}
	}
	// 64 allocations of 256 KiB are 16 MiB, plus the growth of
	// allocationSink. The call before the interval would double it.
	assert.InDelta(t, 16<<20, allocated, 64<<10)

	info, err := os.Stat(cpuPath)
	require.NoError(t, err)
	assert.Positive(t, info.Size())
}

func TestProfilerRejectsUnknownOperation(t *testing.T) {
	var p profiler

	err := p.handle(controlRequest{Op: "dump"})

	require.Error(t, err)
	assert.Contains(t, err.Error(), `unknown operation "dump"`)
}
