package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/google/pprof/profile"
)

// profiler writes the CPU and allocation profiles of one cell in the server
// process. It is not safe for concurrent use: the child's control loop owns
// it.
type profiler struct {
	cpuFile *os.File
	memPath string
	memBase *profile.Profile
	start   time.Time
}

// handle carries out one control request.
func (p *profiler) handle(req controlRequest) error {
	switch req.Op {
	case opStartProfiles:
		return p.startProfiles(req.CPUPath, req.MemPath)
	case opStopProfiles:
		return p.stopProfiles()
	}

	return fmt.Errorf("unknown operation %q, must be %s or %s", req.Op, opStartProfiles, opStopProfiles)
}

// startProfiles starts the CPU profile into cpuPath and takes the
// allocation profile so far as the base that stopProfiles subtracts.
func (p *profiler) startProfiles(cpuPath, memPath string) error {
	if p.cpuFile != nil || p.memPath != "" {
		return errors.New("profiles already started")
	}
	p.start = time.Now()

	if memPath != "" {
		base, err := allocProfile()
		if err != nil {
			return err
		}
		p.memPath, p.memBase = memPath, base
	}

	if cpuPath != "" {
		f, err := os.Create(cpuPath)
		if err != nil {
			p.memPath, p.memBase = "", nil
			return fmt.Errorf("create CPU profile: %w", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			_ = f.Close()
			p.memPath, p.memBase = "", nil
			return fmt.Errorf("start CPU profile %s: %w", cpuPath, err)
		}
		p.cpuFile = f
	}

	return nil
}

// stopProfiles stops the CPU profile and writes the allocations made since
// startProfiles.
func (p *profiler) stopProfiles() error {
	var errs []error

	if p.cpuFile != nil {
		pprof.StopCPUProfile()
		if err := p.cpuFile.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close CPU profile: %w", err))
		}
		p.cpuFile = nil
	}

	if p.memPath != "" {
		if err := writeAllocDelta(p.memPath, p.memBase, time.Since(p.start)); err != nil {
			errs = append(errs, err)
		}
		p.memPath, p.memBase = "", nil
	}

	return errors.Join(errs...)
}

// abort stops a CPU profile left running, so that its file is complete
// when the child exits in the middle of a cell.
func (p *profiler) abort() {
	if p.cpuFile != nil {
		pprof.StopCPUProfile()
		_ = p.cpuFile.Close()
		p.cpuFile = nil
	}
}

// allocProfile returns the allocations of the process so far. It runs a
// garbage collection first, because the runtime publishes allocation
// samples only when a cycle ends.
func allocProfile() (*profile.Profile, error) {
	runtime.GC()

	var buf bytes.Buffer
	if err := pprof.Lookup("allocs").WriteTo(&buf, 0); err != nil {
		return nil, fmt.Errorf("take allocation profile: %w", err)
	}
	p, err := profile.Parse(&buf)
	if err != nil {
		return nil, fmt.Errorf("parse allocation profile: %w", err)
	}

	return p, nil
}

// writeAllocDelta writes to path the allocations made since base, the way
// `go tool pprof -base` subtracts two profiles. The inuse sample types of the
// result are differences too, so only alloc_objects and alloc_space mean
// anything; alloc_space is the default.
func writeAllocDelta(path string, base *profile.Profile, elapsed time.Duration) error {
	end, err := allocProfile()
	if err != nil {
		return err
	}

	base.Scale(-1)
	delta, err := profile.Merge([]*profile.Profile{end, base})
	if err != nil {
		return fmt.Errorf("subtract allocation profiles: %w", err)
	}
	delta.DurationNanos = elapsed.Nanoseconds()
	delta.DefaultSampleType = "alloc_space"
	keepAllocated(delta)

	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create allocation profile: %w", err)
	}
	if err := delta.Write(f); err != nil {
		_ = f.Close()
		return fmt.Errorf("write allocation profile %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close allocation profile %s: %w", path, err)
	}

	return nil
}

// keepAllocated drops the samples of p that allocated nothing in the
// interval, which are most of them after a subtraction.
func keepAllocated(p *profile.Profile) {
	var allocIndexes []int
	for i, st := range p.SampleType {
		if strings.HasPrefix(st.Type, "alloc_") {
			allocIndexes = append(allocIndexes, i)
		}
	}

	allocating := p.Sample[:0]
	for _, s := range p.Sample {
		for _, i := range allocIndexes {
			if s.Value[i] > 0 {
				allocating = append(allocating, s)
				break
			}
		}
	}
	p.Sample = allocating
}

// profilePath returns the profile file of one cell: path with
// -SCENARIO-cCONCURRENCY inserted before its extension, so that
// cpu.pprof becomes cpu-a-c64.pprof. It returns "" when path is "".
func profilePath(path string, id scenarioID, concurrency int) string {
	if path == "" {
		return ""
	}
	ext := filepath.Ext(path)

	return fmt.Sprintf("%s-%s-c%d%s", strings.TrimSuffix(path, ext), id, concurrency, ext)
}
