// Package meteringapi serves MeteringService and MeteringAdminService over
// gRPC: it validates requests, calls the metering package and maps results
// and errors to the protobuf API.
package meteringapi

import (
	"context"
	"crypto/sha256"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/metering"
	"github.com/metering/metering/internal/principal"
)

// API implements MeteringService and MeteringAdminService. It is safe for
// concurrent use.
type API struct {
	svc      *metering.Service
	logger   *slog.Logger
	outcomes *prometheus.CounterVec
}

// New returns an API over svc and registers its metrics with reg, which may
// be nil.
func New(svc *metering.Service, logger *slog.Logger, reg prometheus.Registerer) *API {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	outcomes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "metering_reserve_outcomes_total",
		Help: "CheckAndReserve outcomes per metric: granted, rejected, over_limit_tracked (granted in track-only mode), replayed or error.",
	}, []string{"metric", "outcome"})
	if reg != nil {
		reg.MustRegister(outcomes)
	}
	return &API{svc: svc, logger: logger, outcomes: outcomes}
}

// Register registers both services on s.
func (a *API) Register(s grpc.ServiceRegistrar) {
	meteringv1.RegisterMeteringServiceServer(s, &meteringServer{api: a})
	meteringv1.RegisterMeteringAdminServiceServer(s, &adminServer{api: a})
}

// actor returns how the ledger names the caller in ctx.
func actor(ctx context.Context) string {
	p, _ := principal.FromContext(ctx)
	return p.Actor()
}

// requestHash identifies a request for idempotency: the same method and
// the same fields give the same hash.
func requestHash(method string, req proto.Message) []byte {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(req)
	if err != nil {
		// A message that was just unmarshalled always marshals again.
		panic("marshal request for hashing: " + err.Error())
	}
	h := sha256.New()
	h.Write([]byte(method))
	h.Write([]byte{0})
	h.Write(b)
	return h.Sum(nil)
}
