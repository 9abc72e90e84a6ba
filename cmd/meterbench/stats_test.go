package main

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"google.golang.org/grpc/codes"
)

func TestPercentileNearestRank(t *testing.T) {
	hundred := make([]time.Duration, 100)
	for i := range hundred {
		hundred[i] = time.Duration(i+1) * time.Millisecond
	}
	thousand := make([]time.Duration, 1000)
	for i := range thousand {
		thousand[i] = time.Duration(i+1) * time.Microsecond
	}

	tests := []struct {
		name    string
		samples []time.Duration
		p       float64
		want    time.Duration
	}{
		{"empty", nil, 50, 0},
		{"one sample p50", []time.Duration{7}, 50, 7},
		{"one sample p99.9", []time.Duration{7}, 99.9, 7},
		{"two samples p50", []time.Duration{1, 2}, 50, 1},
		{"two samples p99", []time.Duration{1, 2}, 99, 2},
		{"hundred p50", hundred, 50, 50 * time.Millisecond},
		{"hundred p99", hundred, 99, 99 * time.Millisecond},
		{"hundred p99.9", hundred, 99.9, 100 * time.Millisecond},
		{"thousand p99.9", thousand, 99.9, 999 * time.Microsecond},
		{"p0 is the minimum", hundred, 0, time.Millisecond},
		{"p100 is the maximum", hundred, 100, 100 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, percentile(tt.samples, tt.p))
		})
	}
}

func TestSummariseSortsAndCounts(t *testing.T) {
	samples := []time.Duration{5, 1, 4, 2, 3}
	errors := map[codes.Code]int64{codes.ResourceExhausted: 2}

	s := summarise("CheckAndReserve", samples, errors, 2*time.Second)

	assert.Equal(t, "CheckAndReserve", s.Name)
	assert.Equal(t, int64(5), s.RPCs)
	assert.InDelta(t, 2.5, s.RPCsPerSecond, 1e-9)
	assert.Equal(t, time.Duration(3), s.P50)
	assert.Equal(t, time.Duration(5), s.P99)
	assert.Equal(t, map[string]int64{"ResourceExhausted": 2}, s.Errors)
}
