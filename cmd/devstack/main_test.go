package main

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
	"github.com/metering/metering/internal/auth"
	"github.com/metering/metering/internal/pgtest"
)

func TestRunServesWalkthroughAndStops(t *testing.T) {
	t.Parallel()
	env := map[string]string{"DATABASE_URL": pgtest.NewDatabase(t)}
	dataDir := t.TempDir()
	out := &syncBuffer{}
	var level slog.LevelVar
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{
			"-metering-addr", "127.0.0.1:0", "-workspace-addr", "127.0.0.1:0",
			"-metering-metrics-addr", "", "-workspace-metrics-addr", "", "-data-dir", dataDir,
		}, func(key string) string { return env[key] }, out, slog.New(slog.DiscardHandler), &level)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			assert.NoError(t, err)
		case <-time.After(15 * time.Second):
			t.Error("run did not return after its context was cancelled")
		}
	})

	require.Eventually(t, func() bool { return strings.Contains(out.String(), "Press Ctrl-C") }, 30*time.Second, 20*time.Millisecond,
		"output so far: %s", out.String())
	addrs := regexp.MustCompile(`gRPC on (\S+), the workspace server on (\S+)\.`).FindStringSubmatch(out.String())
	require.Len(t, addrs, 3)

	secret, err := os.Stat(filepath.Join(dataDir, "dev-jwt-secret"))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), secret.Mode().Perm())
	exports, err := os.ReadFile(filepath.Join(dataDir, "devstack.env"))
	require.NoError(t, err)
	operatorToken := regexp.MustCompile(`OPERATOR_TOKEN=(\S+)`).FindStringSubmatch(string(exports))[1]
	userJWT := regexp.MustCompile(`USER_JWT=(\S+)`).FindStringSubmatch(string(exports))[1]

	workspaceConn, err := grpc.NewClient(addrs[2], grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer workspaceConn.Close()
	asUser := metadata.AppendToOutgoingContext(context.Background(), auth.MetadataAuthorization, "Bearer "+userJWT)
	agent, err := workspacev1.NewAgentServiceClient(workspaceConn).CreateAgent(asUser, &workspacev1.CreateAgentRequest{AccountId: "acme", Name: "helper"})
	require.NoError(t, err)
	asWorker := metadata.AppendToOutgoingContext(context.Background(), auth.MetadataServiceToken, agent.GetRuntimeToken())
	_, err = workspacev1.NewTaskServiceClient(workspaceConn).CreateTask(asWorker, &workspacev1.CreateTaskRequest{AccountId: "acme", Title: "First task"})
	require.NoError(t, err)

	meteringConn, err := grpc.NewClient(addrs[1], grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer meteringConn.Close()
	asOperator := metadata.AppendToOutgoingContext(context.Background(), auth.MetadataServiceToken, operatorToken)
	usage, err := meteringv1.NewMeteringServiceClient(meteringConn).GetCurrentUsage(asOperator, &meteringv1.GetCurrentUsageRequest{AccountId: "acme"})
	require.NoError(t, err)
	assert.Equal(t, "free", usage.GetPlanId())
	used := map[meteringv1.Metric]int64{}
	for _, u := range usage.GetUsage() {
		used[u.GetMetric()] = u.GetUsed()
	}
	assert.Equal(t, int64(1), used[meteringv1.Metric_METRIC_AGENTS])
	assert.Equal(t, int64(1), used[meteringv1.Metric_METRIC_TASKS])
}

func TestParseFlagsReadsMakefileEnvironment(t *testing.T) {
	t.Parallel()
	env := map[string]string{"METERING_JWT_ISSUER": "custom-issuer"}

	cfg, err := parseFlags([]string{"-data-dir", "/tmp/dev"}, func(key string) string { return env[key] })

	require.NoError(t, err)
	assert.Equal(t, "custom-issuer", cfg.jwtIssuer)
	assert.Equal(t, defaultAudience, cfg.jwtAudience)
	assert.Equal(t, "/tmp/dev/dev-jwt-secret", cfg.jwtSecretFile)
	assert.Equal(t, "127.0.0.1:50051", cfg.meteringAddr)
	assert.Equal(t, "127.0.0.1:50052", cfg.workspaceAddr)
}

// syncBuffer is a bytes.Buffer that is safe for concurrent use.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()

	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()

	return b.buf.String()
}
