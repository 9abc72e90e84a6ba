package workspaceserver

import (
	"context"
	"net"

	"github.com/metering/metering/internal/workspace"
)

// Option customizes Run beyond what Config sets.
type Option func(*options)

type options struct {
	grpcListener    net.Listener
	metricsListener net.Listener
	writeHook       func(context.Context, workspace.Write) error
}

func newOptions(opts []Option) options {
	var o options
	for _, opt := range opts {
		opt(&o)
	}

	return o
}

// WithGRPCListener makes Run serve gRPC on l in place of listening on
// Config.ListenAddr. Run closes l before it returns.
func WithGRPCListener(l net.Listener) Option {
	return func(o *options) { o.grpcListener = l }
}

// WithMetricsListener makes Run serve /metrics on l in place of listening on
// Config.MetricsAddr, even when MetricsAddr is empty. Run closes l before it
// returns.
func WithMetricsListener(l net.Listener) Option {
	return func(o *options) { o.metricsListener = l }
}

// WithWriteHook sets workspace.Config.WriteHook, which runs inside every
// guarded create after the write; an error from it fails the write. It is
// for tests that inject write failures.
func WithWriteHook(hook func(context.Context, workspace.Write) error) Option {
	return func(o *options) { o.writeHook = hook }
}
