package workspaceserver_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	workspacev1 "github.com/metering/metering/gen/workspace/v1"
	"github.com/metering/metering/internal/auth"
	"github.com/metering/metering/internal/server"
	"github.com/metering/metering/internal/workspace"
	"github.com/metering/metering/internal/workspaceserver"
)

func TestPolicyCoversEveryMethod(t *testing.T) {
	t.Parallel()
	s := grpc.NewServer()
	(&workspace.Service{}).Register(s)
	healthpb.RegisterHealthServer(s, health.NewServer())
	reflection.Register(s)
	policy := workspace.Policy()
	for method, rule := range server.PublicMethods() {
		policy[method] = rule
	}

	assert.NoError(t, workspaceserver.CheckPolicy(policy, s.GetServiceInfo()))

	for service, info := range s.GetServiceInfo() {
		if !slices.Contains([]string{"workspace.v1.AgentService", "workspace.v1.TaskService", "workspace.v1.DocumentService", "workspace.v1.MessageService"}, service) {
			continue
		}
		for _, method := range info.Methods {
			rule, ok := workspace.Policy()["/"+service+"/"+method.Name]
			if assert.True(t, ok, "%s/%s has a rule", service, method.Name) {
				assert.False(t, rule.Public, "%s/%s needs a credential", service, method.Name)
				assert.True(t, rule.OwnAccount, "%s/%s is limited to the caller's account", service, method.Name)
			}
		}
	}

	delete(policy, workspacev1.TaskService_CreateTask_FullMethodName)
	assert.ErrorContains(t, workspaceserver.CheckPolicy(policy, s.GetServiceInfo()), workspacev1.TaskService_CreateTask_FullMethodName)
}

// methodCall calls one workspace method for an account.
type methodCall struct {
	method string
	call   func(ctx context.Context, c clients, account string) error
}

var methodCalls = []methodCall{
	{workspacev1.AgentService_CreateAgent_FullMethodName, func(ctx context.Context, c clients, a string) error {
		_, err := c.agents.CreateAgent(ctx, &workspacev1.CreateAgentRequest{AccountId: a, Name: "matrix"})
		return err
	}},
	{workspacev1.AgentService_DeleteAgent_FullMethodName, func(ctx context.Context, c clients, a string) error {
		_, err := c.agents.DeleteAgent(ctx, &workspacev1.DeleteAgentRequest{AccountId: a, AgentId: "agt_missing"})
		return err
	}},
	{workspacev1.AgentService_RotateAgentToken_FullMethodName, func(ctx context.Context, c clients, a string) error {
		_, err := c.agents.RotateAgentToken(ctx, &workspacev1.RotateAgentTokenRequest{AccountId: a, AgentId: "agt_missing"})
		return err
	}},
	{workspacev1.TaskService_CreateTask_FullMethodName, func(ctx context.Context, c clients, a string) error {
		_, err := c.tasks.CreateTask(ctx, &workspacev1.CreateTaskRequest{AccountId: a, Title: "matrix"})
		return err
	}},
	{workspacev1.DocumentService_CreateDocument_FullMethodName, func(ctx context.Context, c clients, a string) error {
		_, err := c.documents.CreateDocument(ctx, &workspacev1.CreateDocumentRequest{AccountId: a, Name: "matrix", Kind: workspacev1.DocumentKind_DOCUMENT_KIND_FOLDER})
		return err
	}},
	{workspacev1.DocumentService_DuplicateDocument_FullMethodName, func(ctx context.Context, c clients, a string) error {
		_, err := c.documents.DuplicateDocument(ctx, &workspacev1.DuplicateDocumentRequest{AccountId: a, DocumentId: "doc_missing"})
		return err
	}},
	{workspacev1.DocumentService_UpsertDocument_FullMethodName, func(ctx context.Context, c clients, a string) error {
		_, err := c.documents.UpsertDocument(ctx, &workspacev1.UpsertDocumentRequest{AccountId: a, Key: "matrix", Name: "matrix"})
		return err
	}},
	{workspacev1.DocumentService_DeleteDocument_FullMethodName, func(ctx context.Context, c clients, a string) error {
		_, err := c.documents.DeleteDocument(ctx, &workspacev1.DeleteDocumentRequest{AccountId: a, DocumentId: "doc_missing"})
		return err
	}},
	{workspacev1.MessageService_CreateMessage_FullMethodName, func(ctx context.Context, c clients, a string) error {
		_, err := c.messages.CreateMessage(ctx, &workspacev1.CreateMessageRequest{AccountId: a, Body: "matrix"})
		return err
	}},
	{workspacev1.MessageService_UploadAttachment_FullMethodName, func(ctx context.Context, c clients, a string) error {
		_, err := upload(ctx, c.messages, a, &workspacev1.UploadHeader{MessageId: "msg_missing", FileName: "m", Size: 1}, []byte{1}, 1)
		return err
	}},
	{workspacev1.MessageService_DeleteAttachment_FullMethodName, func(ctx context.Context, c clients, a string) error {
		_, err := c.messages.DeleteAttachment(ctx, &workspacev1.DeleteAttachmentRequest{AccountId: a, AttachmentId: "att_missing"})
		return err
	}},
}

func TestAuthorizationMatrix(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	own, other := s.newAccount("own"), s.newAccount("other")
	worker := s.newCaller(t, "runtime", own)
	otherWorker := s.newCaller(t, "runtime", other)

	require.Len(t, methodCalls, len(workspace.Policy()), "every method of the policy is called")
	agentMethods := []string{
		workspacev1.AgentService_CreateAgent_FullMethodName,
		workspacev1.AgentService_DeleteAgent_FullMethodName,
		workspacev1.AgentService_RotateAgentToken_FullMethodName,
	}
	credentials := []struct {
		name string
		ctx  context.Context
		// allowed reports whether the caller may call the method on own.
		allowed func(method string) bool
		denied  codes.Code
	}{
		{"no credential", context.Background(), func(string) bool { return false }, codes.Unauthenticated},
		{"malformed runtime token", runtime("mst_not-a-token"), func(string) bool { return false }, codes.Unauthenticated},
		{"member", s.user(own), func(string) bool { return true }, codes.OK},
		{"account admin", metadata.NewOutgoingContext(context.Background(), s.bearer(auth.DevClaims{Subject: "bob", AccountID: own, Role: auth.RoleAdmin})),
			func(string) bool { return true }, codes.OK},
		{"member of another account", s.user(other), func(string) bool { return false }, codes.PermissionDenied},
		{"operator", s.operator, func(string) bool { return false }, codes.PermissionDenied},
		{"runtime worker", worker.ctx, func(m string) bool { return !slices.Contains(agentMethods, m) }, codes.PermissionDenied},
		{"runtime worker of another account", otherWorker.ctx, func(string) bool { return false }, codes.PermissionDenied},
	}

	for _, cred := range credentials {
		for _, mc := range methodCalls {
			err := mc.call(cred.ctx, s.clients, own)
			code := status.Code(err)
			if cred.allowed(mc.method) {
				assert.NotContains(t, []codes.Code{codes.Unauthenticated, codes.PermissionDenied}, code, "%s calls %s: %v", cred.name, mc.method, err)
				continue
			}
			assert.Equal(t, cred.denied.String(), code.String(), "%s calls %s: %v", cred.name, mc.method, err)
		}
	}

	assert.Equal(t, 0, s.rows(t, "tasks", other), "no call wrote to the other account")
}

func TestRuntimeTokenRotationAndAgentDeletion(t *testing.T) {
	t.Parallel()
	s := startStack(t, stackOptions{})
	account := s.newAccount("rotate")
	user := s.user(account)
	created, err := s.agents.CreateAgent(user, &workspacev1.CreateAgentRequest{AccountId: account, Name: "rotor"})
	require.NoError(t, err)
	agentID := created.GetAgent().GetId()
	oldToken := created.GetRuntimeToken()
	createTask := func(token string) error {
		_, err := s.tasks.CreateTask(runtime(token), &workspacev1.CreateTaskRequest{AccountId: account, Title: "work"})
		return err
	}
	require.NoError(t, createTask(oldToken))

	rotated, err := s.agents.RotateAgentToken(user, &workspacev1.RotateAgentTokenRequest{AccountId: account, AgentId: agentID})
	require.NoError(t, err)
	newToken := rotated.GetRuntimeToken()
	assert.NotEqual(t, oldToken, newToken)

	assert.NoError(t, createTask(newToken))
	waitForCode(t, codes.Unauthenticated, func() error { return createTask(oldToken) }, "the rotated token stops working")

	_, err = s.agents.DeleteAgent(user, &workspacev1.DeleteAgentRequest{AccountId: account, AgentId: agentID})
	require.NoError(t, err)
	waitForCode(t, codes.Unauthenticated, func() error { return createTask(newToken) }, "the token of a deleted agent stops working")

	_, err = s.agents.RotateAgentToken(user, &workspacev1.RotateAgentTokenRequest{AccountId: account, AgentId: agentID})
	requireCode(t, codes.NotFound, err)
}

// waitForCode calls call until it fails with want, for checks that wait out
// the token cache of the server.
func waitForCode(t *testing.T, want codes.Code, call func() error, msg string) {
	t.Helper()
	assert.EventuallyWithT(t, func(c *assert.CollectT) {
		assert.Equal(c, want.String(), status.Code(call()).String())
	}, 5*time.Second, 20*time.Millisecond, msg)
}
