package workspaceserver_test

import (
	"context"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"

	workspacev1 "github.com/metering/metering/gen/workspace/v1"
)

func TestServerReportsHealthAndServicesWithoutLoggingSecrets(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	account := s.newAccount("health")
	created, err := s.agents.CreateAgent(s.user(account), &workspacev1.CreateAgentRequest{AccountId: account, Name: "quiet"})
	require.NoError(t, err)
	_, err = s.tasks.CreateTask(runtime(created.GetRuntimeToken()), &workspacev1.CreateTaskRequest{AccountId: account, Title: "t"})
	require.NoError(t, err)

	health := healthpb.NewHealthClient(s.conn)
	for _, name := range []string{"", "workspace.v1.AgentService", "workspace.v1.TaskService", "workspace.v1.DocumentService", "workspace.v1.MessageService"} {
		assert.EventuallyWithT(t, func(c *assert.CollectT) {
			resp, err := health.Check(context.Background(), &healthpb.HealthCheckRequest{Service: name})
			require.NoError(c, err)
			assert.Equal(c, healthpb.HealthCheckResponse_SERVING, resp.GetStatus())
		}, 10*time.Second, 20*time.Millisecond, "health of %q", name)
	}

	stream, err := reflectionpb.NewServerReflectionClient(s.conn).ServerReflectionInfo(context.Background())
	require.NoError(t, err)
	require.NoError(t, stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}))
	resp, err := stream.Recv()
	require.NoError(t, err)
	require.NoError(t, stream.CloseSend())
	_, err = stream.Recv()
	require.ErrorIs(t, err, io.EOF)
	var services []string
	for _, service := range resp.GetListServicesResponse().GetService() {
		services = append(services, service.GetName())
	}
	assert.Subset(t, services, []string{"workspace.v1.AgentService", "workspace.v1.TaskService", "workspace.v1.DocumentService", "workspace.v1.MessageService"})

	meteringToken, err := os.ReadFile(s.tokenFile)
	require.NoError(t, err)
	logs := s.logs.String()
	assert.Contains(t, logs, "workspace server started")
	assert.NotContains(t, logs, strings.TrimSpace(string(meteringToken)), "the Metering token is never logged")
	assert.NotContains(t, logs, created.GetRuntimeToken(), "runtime tokens are never logged")
	assert.NotContains(t, logs, string(testSecret), "the JWT secret is never logged")
}
