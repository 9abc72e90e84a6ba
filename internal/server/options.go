package server

import (
	"net"

	"google.golang.org/grpc"
)

// Option customizes Run beyond what Config sets.
type Option func(*options)

type options struct {
	grpcListener       net.Listener
	metricsListener    net.Listener
	unaryInterceptors  []grpc.UnaryServerInterceptor
	streamInterceptors []grpc.StreamServerInterceptor
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

// WithUnaryInterceptors adds unary interceptors that run in the given order
// after the metrics, logging and panic recovery interceptors and right
// before the handlers. Authentication interceptors go here, so that their
// rejections are logged and counted and their panics recovered.
func WithUnaryInterceptors(interceptors ...grpc.UnaryServerInterceptor) Option {
	return func(o *options) { o.unaryInterceptors = append(o.unaryInterceptors, interceptors...) }
}

// WithStreamInterceptors adds stream interceptors at the same place in the
// chain as WithUnaryInterceptors does for unary ones.
func WithStreamInterceptors(interceptors ...grpc.StreamServerInterceptor) Option {
	return func(o *options) { o.streamInterceptors = append(o.streamInterceptors, interceptors...) }
}
