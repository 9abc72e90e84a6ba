package main

import (
	"maps"
	"math"
	"slices"
	"time"

	"google.golang.org/grpc/codes"
)

// rpcStats summarises the RPCs of one method, or of all methods, in the
// measurement window of one cell.
type rpcStats struct {
	// Name is the method, or "all" for every RPC of the cell.
	Name string `json:"name"`
	// RPCs counts every RPC that completed in the window, failed ones
	// included.
	RPCs          int64         `json:"rpcs"`
	RPCsPerSecond float64       `json:"rpcs_per_second"`
	P50           time.Duration `json:"p50_ns"`
	P99           time.Duration `json:"p99_ns"`
	P999          time.Duration `json:"p999_ns"`
	// Errors counts the RPCs in the window by status code name; the ones
	// the scenario expects, such as RESOURCE_EXHAUSTED in (c), are here too.
	Errors map[string]int64 `json:"errors,omitempty"`
}

// summarise sorts samples in place and returns their statistics over a
// window of length window.
func summarise(name string, samples []time.Duration, errors map[codes.Code]int64, window time.Duration) rpcStats {
	slices.Sort(samples)

	s := rpcStats{
		Name:          name,
		RPCs:          int64(len(samples)),
		RPCsPerSecond: float64(len(samples)) / window.Seconds(),
		P50:           percentile(samples, 50),
		P99:           percentile(samples, 99),
		P999:          percentile(samples, 99.9),
	}
	for code, n := range errors {
		if s.Errors == nil {
			s.Errors = map[string]int64{}
		}
		s.Errors[code.String()] += n
	}

	return s
}

// percentile returns the p-th percentile of sorted by the nearest-rank
// method: the smallest sample that at least p percent of the samples are
// less than or equal to. It returns 0 for no samples. The samples are exact,
// so the result is one of them, not an interpolation.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	// The epsilon keeps a product that floating point rounds up, such as
	// 99.9% of 1000 = 999.0000000000001, from moving to the next rank.
	rank := int(math.Ceil(p*float64(len(sorted))/100 - 1e-9))
	rank = min(max(rank, 1), len(sorted))

	return sorted[rank-1]
}

// mergeErrors adds the counts of src to dst, allocating dst when nil.
func mergeErrors(dst, src map[codes.Code]int64) map[codes.Code]int64 {
	if len(src) == 0 {
		return dst
	}
	if dst == nil {
		dst = make(map[codes.Code]int64, len(src))
	}
	for code, n := range src {
		dst[code] += n
	}

	return dst
}

// sortedKeys returns the keys of m in order.
func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
