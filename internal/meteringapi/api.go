// Package meteringapi serves the Metering gRPC services.
package meteringapi

import (
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"

	"github.com/metering/metering/internal/metering"
)

// API implements MeteringService and MeteringAdminService.
type API struct{}

// New returns an API over svc that registers its metrics with reg.
func New(svc *metering.Service, logger *slog.Logger, reg prometheus.Registerer) *API {
	return &API{}
}

// Register registers both services on s.
func (a *API) Register(s grpc.ServiceRegistrar) {}
