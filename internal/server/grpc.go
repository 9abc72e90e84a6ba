package server

import (
	"context"
	"fmt"
	"log/slog"
	"runtime/debug"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/recovery"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// Messages and a field key that the go-grpc-middleware v2.3.4 logging
// interceptor uses for its records.
const (
	startedCallMessage = "started call"
	serviceFieldKey    = "grpc.service"
)

// maxHeaderListSize is the largest request header list accepted, in bytes:
// room for an 8 KiB JWT and the usual headers.
const maxHeaderListSize = 16 << 10

// internalErrorMessage is the status message that clients get in place of
// the panic text.
const internalErrorMessage = "internal error"

// NewGRPCServer returns a gRPC server with the interceptors that Run uses:
// Prometheus metrics from metrics, logging to logger without payloads or
// metadata, panic recovery that returns Internal with a generic message, and
// then the interceptors added with WithUnaryInterceptors and
// WithStreamInterceptors. The listener options in opts are ignored. Other
// servers of this module, such as the workspace server, build theirs with it.
func NewGRPCServer(logger *slog.Logger, metrics *grpcprom.ServerMetrics, opts ...Option) *grpc.Server {
	return newGRPCServer(logger, metrics, newOptions(opts))
}

// newGRPCServer returns a gRPC server whose interceptors run in this order:
// Prometheus metrics, logging, panic recovery, the interceptors in opts,
// then the handler. Metrics and logging sit outside recovery so that a
// recovered panic is counted and logged as Internal, and the interceptors in
// opts (authentication) sit inside recovery so that their panics are caught.
func newGRPCServer(logger *slog.Logger, metrics *grpcprom.ServerMetrics, opts options) *grpc.Server {
	loggingOptions := []logging.Option{
		// Only the start and finish events, because the payload events
		// would log request messages, which carry tokens.
		logging.WithLogOnEvents(logging.StartCall, logging.FinishCall),
		logging.WithLevels(finishedCallLevel),
	}
	recoveryOptions := []recovery.Option{
		recovery.WithRecoveryHandlerContext(recoverPanic(logger)),
	}
	rpcLogger := interceptorLogger(logger)

	unary := []grpc.UnaryServerInterceptor{
		metrics.UnaryServerInterceptor(),
		logging.UnaryServerInterceptor(rpcLogger, loggingOptions...),
		recovery.UnaryServerInterceptor(recoveryOptions...),
	}
	stream := []grpc.StreamServerInterceptor{
		metrics.StreamServerInterceptor(),
		logging.StreamServerInterceptor(rpcLogger, loggingOptions...),
		recovery.StreamServerInterceptor(recoveryOptions...),
	}

	return grpc.NewServer(
		// Headers carry at most one credential of auth.MaxJWTBytes, so a
		// client has no reason to send megabytes of them (the grpc-go default).
		grpc.MaxHeaderListSize(maxHeaderListSize),
		grpc.ChainUnaryInterceptor(append(unary, opts.unaryInterceptors...)...),
		grpc.ChainStreamInterceptor(append(stream, opts.streamInterceptors...)...),
	)
}

// finishedCallLevel is the level of a finished call: debug when it succeeded
// and go-grpc-middleware's server default otherwise (info for errors the
// caller can fix, warn for unavailable or exhausted, error for internal).
// Successful calls are counted per method and code in the RPC metrics, so a
// line for each of them would repeat the metrics at a cost on every call.
func finishedCallLevel(code codes.Code) logging.Level {
	if code == codes.OK {
		return logging.LevelDebug
	}
	return logging.DefaultServerCodeToLevel(code)
}

// interceptorLogger adapts logger to the logging interceptor. It logs the
// start of a call at debug, and every record of the gRPC health service at
// debug unless its level is above info, so that load balancer probes do not
// fill the log. Finished calls keep the level of finishedCallLevel.
func interceptorLogger(logger *slog.Logger) logging.Logger {
	return logging.LoggerFunc(func(ctx context.Context, level logging.Level, msg string, fields ...any) {
		slogLevel := slog.Level(level)
		if slogLevel <= slog.LevelInfo && (msg == startedCallMessage || isHealthCall(fields)) {
			slogLevel = slog.LevelDebug
		}

		logger.Log(ctx, slogLevel, msg, fields...)
	})
}

// isHealthCall reports whether the key/value pairs in fields name the gRPC
// health service.
func isHealthCall(fields []any) bool {
	for i := 0; i+1 < len(fields); i += 2 {
		if fields[i] == serviceFieldKey {
			return fields[i+1] == healthpb.Health_ServiceDesc.ServiceName
		}
	}

	return false
}

// recoverPanic returns a recovery handler that logs the panic, the method and
// the stack, and returns Internal with a generic message, so that the panic
// text never reaches the client.
func recoverPanic(logger *slog.Logger) recovery.RecoveryHandlerFuncContext {
	return func(ctx context.Context, p any) error {
		method, _ := grpc.Method(ctx)
		logger.ErrorContext(ctx, "recovered from panic in gRPC handler",
			"grpc_method", method,
			"panic", fmt.Sprint(p),
			"stack", string(debug.Stack()),
		)

		return status.Error(codes.Internal, internalErrorMessage)
	}
}
