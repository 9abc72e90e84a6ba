package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTicksPerSecond is USER_HZ, the unit of the CPU times in /proc. Linux
// fixes it at 100 on every architecture Go supports.
const clockTicksPerSecond = 100

// cpuSnapshot holds CPU times read from /proc at one moment, in clock ticks.
// A field is -1 when it could not be read, as outside Linux.
type cpuSnapshot struct {
	at time.Time
	// server is the user and system time of the server process.
	server int64
	// client is the user and system time of this process, the load
	// generator.
	client int64
	// busy is the time all CPUs of the machine spent running something:
	// neither idle, waiting for I/O, nor stolen by the hypervisor.
	busy int64
	// postgres maps the pid of each PostgreSQL backend connected to the
	// benchmark database to its CPU time. It is nil when PostgreSQL runs
	// elsewhere or the backends cannot be read.
	postgres map[int]int64
}

// cpuUsage is the CPU used during a window, in cores: 1.5 means one and a
// half CPUs busy on average. A field is -1 when unknown.
type cpuUsage struct {
	Server float64 `json:"server_cores"`
	Client float64 `json:"client_cores"`
	// Postgres covers the backends of the benchmark database, not
	// PostgreSQL's background processes such as the WAL writer.
	Postgres float64 `json:"postgres_cores"`
	// Machine covers everything, other processes on a shared machine too.
	Machine float64 `json:"machine_cores"`
}

// takeCPUSnapshot reads the CPU times of the server process serverPID,
// this process, the PostgreSQL backends backendPIDs and the machine.
func takeCPUSnapshot(serverPID int, backendPIDs []int) cpuSnapshot {
	s := cpuSnapshot{
		at:     time.Now(),
		server: processTicks(fmt.Sprintf("/proc/%d/stat", serverPID)),
		client: processTicks("/proc/self/stat"),
		busy:   machineBusyTicks("/proc/stat"),
	}
	if len(backendPIDs) == 0 {
		return s
	}

	s.postgres = make(map[int]int64, len(backendPIDs))
	for _, pid := range backendPIDs {
		// A pid from pg_stat_activity names a local process only when
		// PostgreSQL runs on this machine in the same pid namespace.
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err != nil || !strings.HasPrefix(string(comm), "postgres") {
			return cpuSnapshot{at: s.at, server: s.server, client: s.client, busy: s.busy}
		}
		if ticks := processTicks(fmt.Sprintf("/proc/%d/stat", pid)); ticks >= 0 {
			s.postgres[pid] = ticks
		}
	}

	return s
}

// usageSince returns the CPU used between start and s.
func (s cpuSnapshot) usageSince(start cpuSnapshot) cpuUsage {
	seconds := s.at.Sub(start.at).Seconds()
	cores := func(from, to int64) float64 {
		if from < 0 || to < 0 || seconds <= 0 {
			return -1
		}
		return float64(to-from) / clockTicksPerSecond / seconds
	}

	usage := cpuUsage{
		Server:   cores(start.server, s.server),
		Client:   cores(start.client, s.client),
		Postgres: -1,
		Machine:  cores(start.busy, s.busy),
	}
	if start.postgres != nil && s.postgres != nil {
		// A backend that connected during the window counts from zero,
		// which adds the little CPU it used before the window to it.
		var ticks int64
		for pid, end := range s.postgres {
			ticks += end - start.postgres[pid]
		}
		usage.Postgres = cores(0, ticks)
	}

	return usage
}

// processTicks returns utime + stime of a /proc/PID/stat file, or -1.
func processTicks(path string) int64 {
	data, err := os.ReadFile(path)
	if err != nil {
		return -1
	}
	// The command name in field 2 may contain spaces and parentheses, so
	// the fields are counted from the last ')'. utime and stime are fields
	// 14 and 15, which are the 12th and 13th after it.
	end := strings.LastIndexByte(string(data), ')')
	if end < 0 {
		return -1
	}
	fields := strings.Fields(string(data[end+1:]))
	if len(fields) < 13 {
		return -1
	}
	utime, err1 := strconv.ParseInt(fields[11], 10, 64)
	stime, err2 := strconv.ParseInt(fields[12], 10, 64)
	if err1 != nil || err2 != nil {
		return -1
	}

	return utime + stime
}

// machineBusyTicks returns the busy ticks of all CPUs from the "cpu" line
// of a /proc/stat file, or -1.
func machineBusyTicks(path string) int64 {
	data, err := os.ReadFile(path)
	if err != nil {
		return -1
	}
	line, _, _ := strings.Cut(string(data), "\n")
	fields := strings.Fields(line)
	if len(fields) < 8 || fields[0] != "cpu" {
		return -1
	}

	// The fields are user, nice, system, idle, iowait, irq, softirq, steal,
	// guest and guest_nice. Busy time is user, nice, system, irq and
	// softirq: steal is time the hypervisor gave to another machine, and
	// guest time is already part of user time.
	var busy int64
	for _, i := range []int{1, 2, 3, 6, 7} {
		n, err := strconv.ParseInt(fields[i], 10, 64)
		if err != nil {
			return -1
		}
		busy += n
	}

	return busy
}

// formatCores prints a cpuUsage field, or "?" when unknown.
func formatCores(cores float64) string {
	if cores < 0 {
		return "?"
	}

	return strconv.FormatFloat(cores, 'f', 2, 64)
}
