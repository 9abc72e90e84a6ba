package server_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/auth"
	"github.com/metering/metering/internal/pgtest"
	"github.com/metering/metering/internal/server"
)

const (
	testIssuer   = "metering-test"
	testAudience = "metering"
	ownAccount   = "acct-a"
	otherAccount = "acct-b"
	// missingAccount exists nowhere: a caller bound to another account is
	// denied before anything is looked up, so it learns nothing about it.
	missingAccount = "acct-missing"
)

// authServer is a server with authentication and the credentials of every
// kind of caller.
type authServer struct {
	*testServer
	databaseURL string
	secret      []byte
	creds       map[string]metadata.MD
	tokenIDs    map[string]string
}

func startAuthServer(t *testing.T, cacheTTL time.Duration) *authServer {
	t.Helper()
	databaseURL := pgtest.NewDatabase(t)
	secret := []byte("test-secret-with-at-least-32-bytes-of-entropy!!")
	secretFile := filepath.Join(t.TempDir(), "jwt-secret")
	require.NoError(t, os.WriteFile(secretFile, secret, 0o600))

	cfg := testConfig(databaseURL)
	cfg.Auth.JWTIssuer = testIssuer
	cfg.Auth.JWTAudience = testAudience
	cfg.Auth.JWTSecretFile = secretFile
	cfg.Auth.TokenCacheTTL = cacheTTL
	s := &authServer{
		testServer:  startServer(t, cfg),
		databaseURL: databaseURL,
		secret:      secret,
		creds:       map[string]metadata.MD{},
		tokenIDs:    map[string]string{},
	}

	s.creds["no credential"] = metadata.MD{}
	s.creds["member of own account"] = s.bearer(t, auth.DevClaims{Subject: "alice", AccountID: ownAccount, Role: auth.RoleMember})
	s.creds["account admin of own account"] = s.bearer(t, auth.DevClaims{Subject: "bob", AccountID: ownAccount, Role: auth.RoleAdmin})
	s.creds["operator"] = s.bearer(t, auth.DevClaims{Subject: "ops", PlatformAdmin: true})

	admin := meteringv1.NewMeteringAdminServiceClient(s.conn)
	ctx := metadata.NewOutgoingContext(t.Context(), s.creds["operator"])
	for _, account := range []string{ownAccount, otherAccount} {
		_, err := admin.SetAccountPlan(ctx, &meteringv1.SetAccountPlanRequest{AccountId: account, PlanId: "free"})
		require.NoError(t, err)
	}
	for name, req := range map[string]*meteringv1.IssueServiceTokenRequest{
		"writer for all accounts": {Name: "workspace", Scopes: []string{auth.ScopeUsageWrite}},
		"writer for own account":  {Name: "worker", AccountId: ownAccount, Scopes: []string{auth.ScopeUsageWrite}},
		"reader for own account":  {Name: "dashboard", AccountId: ownAccount, Scopes: []string{auth.ScopeUsageRead}},
		"runtime worker of agent": {Name: "runtime", AccountId: ownAccount, AgentId: "agent-7", Scopes: []string{auth.ScopeUsageWrite}},
		"admin token":             {Name: "ops-bot", Scopes: []string{auth.ScopeAdmin}},
	} {
		res, err := admin.IssueServiceToken(ctx, req)
		require.NoError(t, err)
		s.creds[name] = metadata.Pairs(auth.MetadataServiceToken, res.GetPlaintext())
		s.tokenIDs[name] = res.GetToken().GetId()
	}
	return s
}

func (s *authServer) bearer(t *testing.T, claims auth.DevClaims) metadata.MD {
	t.Helper()
	token, err := auth.MintDevJWT(s.secret, testIssuer, testAudience, claims, time.Now(), time.Hour)
	require.NoError(t, err)
	return metadata.Pairs("authorization", "Bearer "+token)
}

func (s *authServer) call(ctx context.Context, md metadata.MD, method string, req, resp proto.Message) error {
	return s.conn.Invoke(metadata.NewOutgoingContext(ctx, md), method, req, resp)
}

// methodCall builds a request of one method for an account, with the codes
// an allowed caller gets for an existing and for an unknown account.
type methodCall struct {
	method      string
	req         func(account string) proto.Message
	resp        func() proto.Message
	wantExists  codes.Code
	wantMissing codes.Code
}

const missingReservation = "3b241101-e2bb-4255-8caf-4136c566a962"

var meteringCalls = []methodCall{
	{meteringv1.MeteringService_CheckAndReserve_FullMethodName,
		func(a string) proto.Message {
			return &meteringv1.CheckAndReserveRequest{AccountId: a, Items: []*meteringv1.UsageItem{{Metric: meteringv1.Metric_METRIC_TASKS, Amount: 1}}}
		},
		func() proto.Message { return &meteringv1.CheckAndReserveResponse{} },
		codes.OK, codes.NotFound},
	{meteringv1.MeteringService_Commit_FullMethodName,
		func(a string) proto.Message {
			return &meteringv1.CommitRequest{AccountId: a, ReservationId: missingReservation}
		},
		func() proto.Message { return &meteringv1.CommitResponse{} },
		codes.NotFound, codes.NotFound},
	{meteringv1.MeteringService_Release_FullMethodName,
		func(a string) proto.Message {
			return &meteringv1.ReleaseRequest{AccountId: a, ReservationId: missingReservation}
		},
		func() proto.Message { return &meteringv1.ReleaseResponse{} },
		codes.NotFound, codes.NotFound},
	{meteringv1.MeteringService_RecordUsage_FullMethodName,
		func(a string) proto.Message {
			return &meteringv1.RecordUsageRequest{AccountId: a, Items: []*meteringv1.UsageItem{{Metric: meteringv1.Metric_METRIC_MESSAGES, Amount: 1}}}
		},
		func() proto.Message { return &meteringv1.RecordUsageResponse{} },
		codes.OK, codes.NotFound},
	{meteringv1.MeteringService_RecordDeletion_FullMethodName,
		func(a string) proto.Message {
			return &meteringv1.RecordDeletionRequest{AccountId: a, Metric: meteringv1.Metric_METRIC_AGENTS, ResourceId: "agent-1"}
		},
		func() proto.Message { return &meteringv1.RecordDeletionResponse{} },
		codes.NotFound, codes.NotFound},
	{meteringv1.MeteringService_GetCurrentUsage_FullMethodName,
		func(a string) proto.Message { return &meteringv1.GetCurrentUsageRequest{AccountId: a} },
		func() proto.Message { return &meteringv1.GetCurrentUsageResponse{} },
		codes.OK, codes.NotFound},
	{meteringv1.MeteringAdminService_UpsertPlan_FullMethodName,
		func(string) proto.Message { return &meteringv1.UpsertPlanRequest{Plan: &meteringv1.Plan{Id: "p"}} },
		func() proto.Message { return &meteringv1.UpsertPlanResponse{} },
		codes.InvalidArgument, codes.InvalidArgument},
	{meteringv1.MeteringAdminService_ListPlans_FullMethodName,
		func(string) proto.Message { return &meteringv1.ListPlansRequest{} },
		func() proto.Message { return &meteringv1.ListPlansResponse{} },
		codes.OK, codes.OK},
	{meteringv1.MeteringAdminService_SetAccountPlan_FullMethodName,
		func(a string) proto.Message {
			return &meteringv1.SetAccountPlanRequest{AccountId: a, PlanId: "no-such-plan"}
		},
		func() proto.Message { return &meteringv1.SetAccountPlanResponse{} },
		codes.NotFound, codes.NotFound},
	{meteringv1.MeteringAdminService_GetAccount_FullMethodName,
		func(a string) proto.Message { return &meteringv1.GetAccountRequest{AccountId: a} },
		func() proto.Message { return &meteringv1.GetAccountResponse{} },
		codes.OK, codes.NotFound},
	{meteringv1.MeteringAdminService_ListReservations_FullMethodName,
		func(a string) proto.Message { return &meteringv1.ListReservationsRequest{AccountId: a} },
		func() proto.Message { return &meteringv1.ListReservationsResponse{} },
		codes.OK, codes.NotFound},
	{meteringv1.MeteringAdminService_AdjustUsage_FullMethodName,
		func(a string) proto.Message {
			return &meteringv1.AdjustUsageRequest{AccountId: a, Metric: meteringv1.Metric_METRIC_TASKS, Delta: 1, Reason: "test"}
		},
		func() proto.Message { return &meteringv1.AdjustUsageResponse{} },
		codes.OK, codes.NotFound},
	{meteringv1.MeteringAdminService_IssueServiceToken_FullMethodName,
		func(a string) proto.Message {
			return &meteringv1.IssueServiceTokenRequest{Name: "n", AccountId: a, Scopes: []string{auth.ScopeUsageRead}}
		},
		func() proto.Message { return &meteringv1.IssueServiceTokenResponse{} },
		codes.OK, codes.NotFound},
	{meteringv1.MeteringAdminService_ListServiceTokens_FullMethodName,
		func(a string) proto.Message { return &meteringv1.ListServiceTokensRequest{AccountId: a} },
		func() proto.Message { return &meteringv1.ListServiceTokensResponse{} },
		codes.OK, codes.OK},
	{meteringv1.MeteringAdminService_RevokeServiceToken_FullMethodName,
		func(string) proto.Message { return &meteringv1.RevokeServiceTokenRequest{Id: "tok_missing"} },
		func() proto.Message { return &meteringv1.RevokeServiceTokenResponse{} },
		codes.NotFound, codes.NotFound},
}

// access is what a caller may do with a method.
type access int

const (
	denied access = iota
	ownOnly
	anyAccount
)

func TestAuthorizationMatrix(t *testing.T) {
	t.Parallel()
	s := startAuthServer(t, auth.DefaultTokenCacheTTL)

	write := []string{
		meteringv1.MeteringService_CheckAndReserve_FullMethodName,
		meteringv1.MeteringService_Commit_FullMethodName,
		meteringv1.MeteringService_Release_FullMethodName,
		meteringv1.MeteringService_RecordUsage_FullMethodName,
		meteringv1.MeteringService_RecordDeletion_FullMethodName,
	}
	usage := meteringv1.MeteringService_GetCurrentUsage_FullMethodName
	var admin []string
	for _, c := range meteringCalls {
		if c.method != usage && !contains(write, c.method) {
			admin = append(admin, c.method)
		}
	}
	grants := func(a access, methods ...string) map[string]access {
		m := map[string]access{}
		for _, method := range methods {
			m[method] = a
		}
		return m
	}
	merge := func(maps ...map[string]access) map[string]access {
		out := map[string]access{}
		for _, m := range maps {
			for k, v := range m {
				out[k] = v
			}
		}
		return out
	}

	tests := map[string]map[string]access{
		"member of own account":        grants(ownOnly, usage),
		"account admin of own account": grants(ownOnly, usage),
		"operator":                     merge(grants(anyAccount, usage), grants(anyAccount, admin...)),
		"writer for all accounts":      grants(anyAccount, append(write, usage)...),
		"writer for own account":       grants(ownOnly, append(write, usage)...),
		"runtime worker of agent":      grants(ownOnly, append(write, usage)...),
		"reader for own account":       grants(ownOnly, usage),
		"admin token":                  merge(grants(anyAccount, usage), grants(anyAccount, admin...)),
	}

	for name, allowed := range tests {
		for _, c := range meteringCalls {
			for _, account := range []string{ownAccount, otherAccount, missingAccount} {
				err := s.call(t.Context(), s.creds[name], c.method, c.req(account), c.resp())

				want := codes.PermissionDenied
				access := allowed[c.method]
				if access == anyAccount || (access == ownOnly && account == ownAccount) {
					want = c.wantExists
					if account == missingAccount {
						want = c.wantMissing
					}
				}
				assert.Equal(t, want, status.Code(err), "%s calling %s on %s: %v", name, c.method, account, err)
			}
		}
	}

	for _, c := range meteringCalls {
		err := s.call(t.Context(), s.creds["no credential"], c.method, c.req(ownAccount), c.resp())
		assert.Equal(t, codes.Unauthenticated, status.Code(err), "%s without a credential", c.method)
	}
}

func TestAuthorizationCoversEveryMethod(t *testing.T) {
	t.Parallel()
	s := startAuthServer(t, auth.DefaultTokenCacheTTL)

	var methods []string
	for _, c := range meteringCalls {
		methods = append(methods, c.method)
	}
	for _, service := range listServices(t, s.conn) {
		if service == meteringv1.MeteringService_ServiceDesc.ServiceName || service == meteringv1.MeteringAdminService_ServiceDesc.ServiceName {
			continue
		}
		assert.Contains(t, []string{"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}, service,
			"a new service needs rules in the policy and in this test")
	}
	for _, desc := range []grpc.ServiceDesc{meteringv1.MeteringService_ServiceDesc, meteringv1.MeteringAdminService_ServiceDesc} {
		for _, m := range desc.Methods {
			assert.Contains(t, methods, "/"+desc.ServiceName+"/"+m.MethodName, "the matrix test must cover every method")
		}
	}
	assert.Empty(t, server.MissingRules(), "every registered method needs a rule")
}

func TestHealthAndReflectionNeedNoCredential(t *testing.T) {
	t.Parallel()
	s := startAuthServer(t, auth.DefaultTokenCacheTTL)

	_, err := healthpb.NewHealthClient(s.conn).Check(t.Context(), &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	assert.NotEmpty(t, listServices(t, s.conn))
}

func TestLedgerRecordsActor(t *testing.T) {
	t.Parallel()
	s := startAuthServer(t, auth.DefaultTokenCacheTTL)
	client := meteringv1.NewMeteringServiceClient(s.conn)
	ctx := metadata.NewOutgoingContext(t.Context(), s.creds["runtime worker of agent"])

	res, err := client.CheckAndReserve(ctx, &meteringv1.CheckAndReserveRequest{
		AccountId: ownAccount, Items: []*meteringv1.UsageItem{{Metric: meteringv1.Metric_METRIC_AGENTS, Amount: 1}}, ResourceId: "agent-9",
	})
	require.NoError(t, err)
	_, err = client.Commit(ctx, &meteringv1.CommitRequest{AccountId: ownAccount, ReservationId: res.GetReservation().GetId()})
	require.NoError(t, err)

	var actor string
	require.NoError(t, queryRow(t, s.databaseURL, "SELECT actor FROM metering.usage_events").Scan(&actor))
	assert.Equal(t, "token:"+s.tokenIDs["runtime worker of agent"]+"/agent:agent-7", actor)
}

func TestRevokedTokenStopsWithinCacheTTL(t *testing.T) {
	t.Parallel()
	const cacheTTL = 300 * time.Millisecond
	s := startAuthServer(t, cacheTTL)
	client := meteringv1.NewMeteringServiceClient(s.conn)
	ctx := metadata.NewOutgoingContext(t.Context(), s.creds["reader for own account"])
	_, err := client.GetCurrentUsage(ctx, &meteringv1.GetCurrentUsageRequest{AccountId: ownAccount})
	require.NoError(t, err, "the token works and is now cached")

	admin := meteringv1.NewMeteringAdminServiceClient(s.conn)
	_, err = admin.RevokeServiceToken(metadata.NewOutgoingContext(t.Context(), s.creds["operator"]),
		&meteringv1.RevokeServiceTokenRequest{Id: s.tokenIDs["reader for own account"]})
	require.NoError(t, err)
	revoked := time.Now()

	require.Eventually(t, func() bool {
		_, err := client.GetCurrentUsage(ctx, &meteringv1.GetCurrentUsageRequest{AccountId: ownAccount})
		return status.Code(err) == codes.Unauthenticated
	}, 5*time.Second, 20*time.Millisecond)
	assert.Less(t, time.Since(revoked), cacheTTL+time.Second, "a revoked token must stop within the cache TTL")

	list, err := admin.ListServiceTokens(metadata.NewOutgoingContext(t.Context(), s.creds["operator"]),
		&meteringv1.ListServiceTokensRequest{AccountId: ownAccount, IncludeRevoked: true})
	require.NoError(t, err)
	for _, tok := range list.GetTokens() {
		if tok.GetId() == s.tokenIDs["reader for own account"] {
			assert.NotNil(t, tok.GetRevokeTime())
		}
	}
}

func TestServiceTokensStoredHashed(t *testing.T) {
	t.Parallel()
	s := startAuthServer(t, auth.DefaultTokenCacheTTL)
	plaintext := s.creds["writer for all accounts"].Get(auth.MetadataServiceToken)[0]

	var stored []byte
	require.NoError(t, queryRow(t, s.databaseURL, "SELECT token_hash FROM metering.service_tokens WHERE id = $1",
		s.tokenIDs["writer for all accounts"]).Scan(&stored))
	hash := auth.HashServiceToken(plaintext)
	assert.Equal(t, hash[:], stored)
	assert.NotContains(t, s.logs.String(), plaintext, "a token must never be logged")
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
