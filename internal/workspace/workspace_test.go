package workspace

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/time/rate"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestConfigValidateNamesEveryBadField(t *testing.T) {
	t.Parallel()

	err := Config{
		ReservationTTL:       time.Millisecond,
		UploadReservationTTL: 2 * time.Hour,
		MaxUploadBytes:       -1,
		UploadIdleTimeout:    -time.Second,
		MeteringTimeout:      -time.Second,
		MeteringAttempts:     -1,
		MeteringBackoff:      -time.Second,
	}.Validate()

	for _, want := range []string{
		"Pool is required", "Metering is required", "BlobDir is required",
		"ReservationTTL is 1ms", "UploadReservationTTL is 2h0m0s", "MaxUploadBytes is -1", "UploadIdleTimeout is -1s",
		"MeteringTimeout is -1s", "MeteringAttempts is -1", "MeteringBackoff is -1s",
	} {
		assert.ErrorContains(t, err, want)
	}
}

func TestResourceIDIsStablePerRequest(t *testing.T) {
	t.Parallel()

	first := resourceID(taskPrefix, "acme", "req-1")

	assert.Equal(t, first, resourceID(taskPrefix, "acme", "req-1"))
	assert.NotEqual(t, first, resourceID(taskPrefix, "globex", "req-1"), "request ids are per account")
	assert.NotEqual(t, resourceID(taskPrefix, "acme", ""), resourceID(taskPrefix, "acme", ""), "without a request id every id is new")
	assert.True(t, strings.HasPrefix(first, taskPrefix))
	assert.Len(t, first, len(taskPrefix)+32)
}

func TestMeteringKeyBaseFitsMeteringKeys(t *testing.T) {
	t.Parallel()

	base := meteringKeyBase(strings.Repeat("é", MaxIDLength))

	assert.LessOrEqual(t, len(base)+len(fmt.Sprintf("/%d", maxKeyGenerations)), MaxIDLength)
	assert.Empty(t, meteringKeyBase(""))
}

func TestToStatusMapsMeteringErrors(t *testing.T) {
	t.Parallel()
	var logs bytes.Buffer
	s := &Service{logger: slog.New(slog.NewTextHandler(&logs, nil)), outageLog: &rate.Sometimes{Interval: time.Hour}}
	ctx := context.Background()
	meteringStatus := func(code codes.Code, msg string, details ...*errdetails.ErrorInfo) *status.Status {
		st := status.New(code, msg)
		for _, d := range details {
			var err error
			st, err = st.WithDetails(d)
			require.NoError(t, err)
		}
		return st
	}
	expired := &meteringError{method: "Commit", status: meteringStatus(codes.FailedPrecondition, "reservation expired",
		&errdetails.ErrorInfo{Reason: meteringReasonReservationExpired, Domain: "metering"})}
	reused := &meteringError{method: "CheckAndReserve", keyField: "request_id", keyValue: "r1", status: meteringStatus(codes.InvalidArgument, "key reused",
		&errdetails.ErrorInfo{Reason: meteringReasonKeyReused, Domain: "metering"})}

	tests := []struct {
		name string
		err  error
		code codes.Code
	}{
		{"quota passes through", &meteringError{status: meteringStatus(codes.ResourceExhausted, "limit")}, codes.ResourceExhausted},
		{"expired reservation", expired, codes.ResourceExhausted},
		{"key reused", reused, codes.InvalidArgument},
		{"unreachable", &meteringError{status: status.New(codes.Unavailable, "connection refused")}, codes.Unavailable},
		{"timed out", &meteringError{status: status.New(codes.DeadlineExceeded, "deadline")}, codes.Unavailable},
		{"rejected credentials", &meteringError{status: status.New(codes.Unauthenticated, "token revoked")}, codes.Unavailable},
		{"bug in a request", &meteringError{status: status.New(codes.InvalidArgument, "items: bad")}, codes.Internal},
		{"database down", fmt.Errorf("begin: %w", errDatabaseUnavailable), codes.Unavailable},
		{"unknown error", errors.New("boom: SELECT secret FROM t"), codes.Internal},
		{"canceled", fmt.Errorf("metering Commit: %w", context.Canceled), codes.Canceled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := status.Convert(s.toStatus(ctx, tt.err))

			assert.Equal(t, tt.code, st.Code())
			assert.NotContains(t, st.Message(), "SELECT")
		})
	}

	st := status.Convert(s.toStatus(ctx, expired))
	assert.Equal(t, meteringReasonReservationExpired, errorReason(st), "the details of Metering are kept")
	st = status.Convert(s.toStatus(ctx, reused))
	require.Len(t, st.Details(), 1)
	assert.Equal(t, "request_id", st.Details()[0].(*errdetails.BadRequest).GetFieldViolations()[0].GetField())
	assert.Contains(t, logs.String(), "boom", "unknown errors are logged")
}
