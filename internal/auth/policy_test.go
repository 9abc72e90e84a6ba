package auth

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/metering/metering/internal/principal"
)

// testService is a small gRPC service with unary, client-streaming and
// server-streaming methods, registered through a hand-written ServiceDesc.
const testService = "authtest.Test"

// accountMessage is a request with an account_id. It is a
// wrapperspb.StringValue on the wire, so the test needs no generated code.
type accountMessage struct {
	*wrapperspb.StringValue
}

func newAccountMessage(account string) *accountMessage {
	return &accountMessage{StringValue: wrapperspb.String(account)}
}

func (m *accountMessage) GetAccountId() string {
	return m.GetValue()
}

// replyFor returns the handler's response: the caller's actor and the
// accounts it received, so tests can check what reached the handler.
func replyFor(ctx context.Context, accounts ...string) *wrapperspb.StringValue {
	caller, _ := principal.FromContext(ctx)
	reply := caller.Actor()
	for _, account := range accounts {
		reply += "|" + account
	}

	return wrapperspb.String(reply)
}

func unaryTestHandler(method string) grpc.MethodHandler {
	return func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
		in := newAccountMessage("")
		if err := dec(in); err != nil {
			return nil, err
		}
		handle := func(ctx context.Context, req any) (any, error) {
			return replyFor(ctx, req.(*accountMessage).GetAccountId()), nil
		}
		if interceptor == nil {
			return handle(ctx, in)
		}

		return interceptor(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: "/" + testService + "/" + method}, handle)
	}
}

// uploadTestHandler receives messages until the client closes its side,
// then sends one response.
func uploadTestHandler(_ any, stream grpc.ServerStream) error {
	var accounts []string
	for {
		in := newAccountMessage("")
		err := stream.RecvMsg(in)
		if errors.Is(err, io.EOF) {
			return stream.SendMsg(replyFor(stream.Context(), accounts...))
		}
		if err != nil {
			return err
		}
		accounts = append(accounts, in.GetAccountId())
	}
}

// watchTestHandler receives one message and sends one response.
func watchTestHandler(_ any, stream grpc.ServerStream) error {
	in := newAccountMessage("")
	if err := stream.RecvMsg(in); err != nil {
		return err
	}

	return stream.SendMsg(replyFor(stream.Context(), in.GetAccountId()))
}

var testServiceDesc = grpc.ServiceDesc{
	ServiceName: testService,
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{
		{MethodName: "Read", Handler: unaryTestHandler("Read")},
		{MethodName: "Write", Handler: unaryTestHandler("Write")},
		{MethodName: "Admin", Handler: unaryTestHandler("Admin")},
		{MethodName: "Unlisted", Handler: unaryTestHandler("Unlisted")},
	},
	Streams: []grpc.StreamDesc{
		{StreamName: "Upload", Handler: uploadTestHandler, ClientStreams: true},
		{StreamName: "Watch", Handler: watchTestHandler, ServerStreams: true},
	},
}

// testPolicy covers every method of the test server except
// authtest.Test/Unlisted and grpc.health.v1.Health/List.
func testPolicy() Policy {
	return Policy{
		"/authtest.Test/Read": {
			Operator: true, UserRoles: []string{RoleMember, RoleAdmin},
			Scopes: []string{ScopeUsageRead, ScopeUsageWrite}, OwnAccount: true,
		},
		"/authtest.Test/Write":  {Scopes: []string{ScopeUsageWrite}, OwnAccount: true},
		"/authtest.Test/Admin":  {Operator: true, Scopes: []string{ScopeAdmin}},
		"/authtest.Test/Upload": {Scopes: []string{ScopeUsageWrite}, OwnAccount: true},
		"/authtest.Test/Watch": {
			Operator: true, UserRoles: []string{RoleMember, RoleAdmin},
			Scopes: []string{ScopeUsageRead}, OwnAccount: true,
		},
		healthpb.Health_Check_FullMethodName:                             {Public: true},
		healthpb.Health_Watch_FullMethodName:                             {Public: true},
		"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      {Public: true},
		"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": {Public: true},
	}
}

// testEnv is a running test server with its credentials.
type testEnv struct {
	server *grpc.Server
	conn   *grpc.ClientConn
	store  *memTokenStore
	// credentials maps a principal name to its metadata key and value.
	credentials map[string][2]string
}

func startTestServer(t *testing.T) *testEnv {
	t.Helper()

	store := newMemTokenStore()
	a := newTestAuthenticator(t, testConfig(t, store))
	unary, stream := Interceptors(a, testPolicy())

	server := grpc.NewServer(grpc.ChainUnaryInterceptor(unary), grpc.ChainStreamInterceptor(stream))
	server.RegisterService(&testServiceDesc, struct{}{})
	healthpb.RegisterHealthServer(server, health.NewServer())
	reflection.Register(server)

	listener := bufconn.Listen(1 << 20)
	go func() { _ = server.Serve(listener) }()
	t.Cleanup(server.Stop)

	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return listener.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })

	mint := func(claims DevClaims) [2]string {
		token, err := MintDevJWT(testSecret, testIssuer, testAudience, claims, testNow, time.Hour)
		require.NoError(t, err)
		return [2]string{MetadataAuthorization, "Bearer " + token}
	}
	issue := func(token ServiceToken) [2]string {
		return [2]string{MetadataServiceToken, store.issue(t, token)}
	}

	return &testEnv{
		server: server,
		conn:   conn,
		store:  store,
		credentials: map[string][2]string{
			"member":   mint(DevClaims{Subject: "member-1", AccountID: ownAccount, Role: RoleMember}),
			"admin":    mint(DevClaims{Subject: "admin-1", AccountID: ownAccount, Role: RoleAdmin}),
			"operator": mint(DevClaims{Subject: testOperator, PlatformAdmin: true}),
			"worker": issue(ServiceToken{ID: "tok-worker", AccountID: ownAccount, AgentID: "agent-1",
				Scopes: []string{ScopeUsageWrite}}),
			"reader":        issue(ServiceToken{ID: "tok-reader", AccountID: ownAccount, Scopes: []string{ScopeUsageRead}}),
			"service":       issue(ServiceToken{ID: "tok-service", Scopes: []string{ScopeUsageRead, ScopeUsageWrite}}),
			"admin token":   issue(ServiceToken{ID: "tok-admin", Scopes: []string{ScopeAdmin}}),
			"revoked":       issue(ServiceToken{ID: "tok-revoked", Scopes: []string{ScopeAdmin, ScopeUsageRead, ScopeUsageWrite}, Revoked: true}),
			"no credential": {},
		},
	}
}

// context returns a context carrying the credential of the named principal.
func (e *testEnv) context(t *testing.T, name string) context.Context {
	t.Helper()

	credential, ok := e.credentials[name]
	require.True(t, ok, "unknown principal %q", name)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	t.Cleanup(cancel)
	if credential[0] == "" {
		return ctx
	}

	return metadata.AppendToOutgoingContext(ctx, credential[0], credential[1])
}

// call calls a method of the test service with one message naming account
// and returns the reply and the error.
func (e *testEnv) call(ctx context.Context, method, account string) (string, error) {
	reply := new(wrapperspb.StringValue)
	fullMethod := "/" + testService + "/" + method

	switch method {
	case "Upload", "Watch":
		desc := &testServiceDesc.Streams[0]
		if method == "Watch" {
			desc = &testServiceDesc.Streams[1]
		}
		stream, err := e.conn.NewStream(ctx, desc, fullMethod)
		if err != nil {
			return "", err
		}
		// A send error shows up again in RecvMsg, with the status.
		_ = stream.SendMsg(newAccountMessage(account))
		_ = stream.CloseSend()
		err = stream.RecvMsg(reply)
		return reply.GetValue(), err
	default:
		err := e.conn.Invoke(ctx, fullMethod, newAccountMessage(account), reply)
		return reply.GetValue(), err
	}
}

// TestInterceptorsPrincipalMethodAccount calls every method of the test
// service as every kind of principal, naming its own account, another
// account and no account.
func TestInterceptorsPrincipalMethodAccount(t *testing.T) {
	t.Parallel()

	env := startTestServer(t)
	const (
		ok     = codes.OK
		denied = codes.PermissionDenied
		unauth = codes.Unauthenticated
	)

	tests := []struct {
		principal string
		method    string
		own       codes.Code
		other     codes.Code
		empty     codes.Code
	}{
		{"member", "Read", ok, denied, denied},
		{"member", "Write", denied, denied, denied},
		{"member", "Admin", denied, denied, denied},
		{"member", "Upload", denied, denied, denied},
		{"member", "Watch", ok, denied, denied},
		{"member", "Unlisted", denied, denied, denied},

		{"admin", "Read", ok, denied, denied},
		{"admin", "Write", denied, denied, denied},
		{"admin", "Admin", denied, denied, denied},
		{"admin", "Upload", denied, denied, denied},
		{"admin", "Watch", ok, denied, denied},
		{"admin", "Unlisted", denied, denied, denied},

		{"operator", "Read", ok, ok, ok},
		{"operator", "Write", denied, denied, denied},
		{"operator", "Admin", ok, ok, ok},
		{"operator", "Upload", denied, denied, denied},
		{"operator", "Watch", ok, ok, ok},
		{"operator", "Unlisted", denied, denied, denied},

		{"worker", "Read", ok, denied, denied},
		{"worker", "Write", ok, denied, denied},
		{"worker", "Admin", denied, denied, denied},
		{"worker", "Upload", ok, denied, denied},
		{"worker", "Watch", denied, denied, denied},
		{"worker", "Unlisted", denied, denied, denied},

		{"reader", "Read", ok, denied, denied},
		{"reader", "Write", denied, denied, denied},
		{"reader", "Admin", denied, denied, denied},
		{"reader", "Upload", denied, denied, denied},
		{"reader", "Watch", ok, denied, denied},
		{"reader", "Unlisted", denied, denied, denied},

		{"service", "Read", ok, ok, ok},
		{"service", "Write", ok, ok, ok},
		{"service", "Admin", denied, denied, denied},
		{"service", "Upload", ok, ok, ok},
		{"service", "Watch", ok, ok, ok},
		{"service", "Unlisted", denied, denied, denied},

		{"admin token", "Read", denied, denied, denied},
		{"admin token", "Write", denied, denied, denied},
		{"admin token", "Admin", ok, ok, ok},
		{"admin token", "Upload", denied, denied, denied},
		{"admin token", "Watch", denied, denied, denied},
		{"admin token", "Unlisted", denied, denied, denied},

		{"revoked", "Read", unauth, unauth, unauth},
		{"revoked", "Write", unauth, unauth, unauth},
		{"revoked", "Admin", unauth, unauth, unauth},
		{"revoked", "Upload", unauth, unauth, unauth},
		{"revoked", "Watch", unauth, unauth, unauth},
		{"revoked", "Unlisted", denied, denied, denied},

		{"no credential", "Read", unauth, unauth, unauth},
		{"no credential", "Write", unauth, unauth, unauth},
		{"no credential", "Admin", unauth, unauth, unauth},
		{"no credential", "Upload", unauth, unauth, unauth},
		{"no credential", "Watch", unauth, unauth, unauth},
		{"no credential", "Unlisted", denied, denied, denied},
	}
	for _, tt := range tests {
		accounts := []struct {
			name    string
			account string
			want    codes.Code
		}{
			{"own account", ownAccount, tt.own},
			{"other account", otherAccount, tt.other},
			{"no account", "", tt.empty},
		}
		for _, account := range accounts {
			t.Run(tt.principal+"/"+tt.method+"/"+account.name, func(t *testing.T) {
				t.Parallel()

				_, err := env.call(env.context(t, tt.principal), tt.method, account.account)

				assert.Equal(t, account.want, status.Code(err), "status: %v", err)
			})
		}
	}
}

func TestInterceptorsHandlerSeesPrincipal(t *testing.T) {
	t.Parallel()

	env := startTestServer(t)

	tests := []struct {
		principal string
		method    string
		want      string
	}{
		{"member", "Read", "user:member-1|" + ownAccount},
		{"operator", "Admin", "operator:" + testOperator + "|" + otherAccount},
		{"worker", "Write", "token:tok-worker/agent:agent-1|" + ownAccount},
		{"worker", "Upload", "token:tok-worker/agent:agent-1|" + ownAccount},
		{"reader", "Watch", "token:tok-reader|" + ownAccount},
	}
	for _, tt := range tests {
		t.Run(tt.principal+"/"+tt.method, func(t *testing.T) {
			t.Parallel()

			account := ownAccount
			if tt.method == "Admin" {
				account = otherAccount
			}
			reply, err := env.call(env.context(t, tt.principal), tt.method, account)
			require.NoError(t, err)

			assert.Equal(t, tt.want, reply)
		})
	}
}

// TestInterceptorsUploadChecksEveryMessage sends several messages on a
// client stream of a worker bound to ownAccount.
func TestInterceptorsUploadChecksEveryMessage(t *testing.T) {
	t.Parallel()

	env := startTestServer(t)

	tests := []struct {
		name     string
		accounts []string
		want     codes.Code
		reply    string
	}{
		{"own then own", []string{ownAccount, ownAccount}, codes.OK, "token:tok-worker/agent:agent-1|acct-a|acct-a"},
		{"own then empty", []string{ownAccount, ""}, codes.OK, "token:tok-worker/agent:agent-1|acct-a|"},
		{"own then other", []string{ownAccount, otherAccount}, codes.PermissionDenied, ""},
		{"empty first", []string{"", ownAccount}, codes.PermissionDenied, ""},
		{"other first", []string{otherAccount, ownAccount}, codes.PermissionDenied, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			stream, err := env.conn.NewStream(env.context(t, "worker"), &testServiceDesc.Streams[0], "/"+testService+"/Upload")
			require.NoError(t, err)
			for _, account := range tt.accounts {
				_ = stream.SendMsg(newAccountMessage(account))
			}
			require.NoError(t, stream.CloseSend())
			reply := new(wrapperspb.StringValue)
			err = stream.RecvMsg(reply)

			assert.Equal(t, tt.want, status.Code(err), "status: %v", err)
			assert.Equal(t, tt.reply, reply.GetValue())
		})
	}
}

func TestInterceptorsStreamWithoutCredential(t *testing.T) {
	t.Parallel()

	env := startTestServer(t)

	for _, method := range []string{"Upload", "Watch"} {
		t.Run(method, func(t *testing.T) {
			t.Parallel()

			_, err := env.call(env.context(t, "no credential"), method, ownAccount)

			assert.Equal(t, codes.Unauthenticated, status.Code(err))
			assert.Contains(t, status.Convert(err).Message(), "missing credential")
		})
	}
}

func TestInterceptorsPublicMethodsWithoutCredential(t *testing.T) {
	t.Parallel()

	env := startTestServer(t)
	ctx := env.context(t, "no credential")

	t.Run("health check", func(t *testing.T) {
		resp, err := healthpb.NewHealthClient(env.conn).Check(ctx, &healthpb.HealthCheckRequest{})
		require.NoError(t, err)
		assert.Equal(t, healthpb.HealthCheckResponse_SERVING, resp.GetStatus())
	})

	t.Run("health watch", func(t *testing.T) {
		stream, err := healthpb.NewHealthClient(env.conn).Watch(ctx, &healthpb.HealthCheckRequest{})
		require.NoError(t, err)
		resp, err := stream.Recv()
		require.NoError(t, err)
		assert.Equal(t, healthpb.HealthCheckResponse_SERVING, resp.GetStatus())
	})

	t.Run("reflection", func(t *testing.T) {
		stream, err := reflectionpb.NewServerReflectionClient(env.conn).ServerReflectionInfo(ctx)
		require.NoError(t, err)
		require.NoError(t, stream.Send(&reflectionpb.ServerReflectionRequest{
			MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{},
		}))
		resp, err := stream.Recv()
		require.NoError(t, err)

		var services []string
		for _, service := range resp.GetListServicesResponse().GetService() {
			services = append(services, service.GetName())
		}
		assert.Contains(t, services, testService)
	})

	t.Run("unlisted health method", func(t *testing.T) {
		_, err := healthpb.NewHealthClient(env.conn).List(ctx, &healthpb.HealthListRequest{})
		assert.Equal(t, codes.PermissionDenied, status.Code(err))
		assert.Contains(t, status.Convert(err).Message(), "has no access rule")
	})
}

// TestInterceptorsMetadataOnTheWire sends credentials through a real
// client, where grpc-go lowercases metadata keys.
func TestInterceptorsMetadataOnTheWire(t *testing.T) {
	t.Parallel()

	env := startTestServer(t)
	jwtValue := env.credentials["member"][1]
	tokenValue := env.credentials["worker"][1]

	tests := []struct {
		name string
		md   metadata.MD
		want codes.Code
	}{
		// metadata.Pairs and AppendToOutgoingContext lowercase keys. grpc-go
		// v1.85 rejects a metadata.MD literal with upper-case keys on the
		// client, before anything is sent.
		{"Authorization capitalised", metadata.Pairs("Authorization", jwtValue), codes.OK},
		{"X-Service-Token capitalised", metadata.Pairs("X-Service-Token", tokenValue), codes.OK},
		{"AUTHORIZATION upper case", metadata.Pairs("AUTHORIZATION", jwtValue), codes.OK},
		{"both credentials", metadata.Pairs(MetadataAuthorization, jwtValue, MetadataServiceToken, tokenValue), codes.Unauthenticated},
		{"authorization repeated", metadata.Pairs(MetadataAuthorization, jwtValue, "Authorization", jwtValue), codes.Unauthenticated},
		{"service token repeated", metadata.MD{MetadataServiceToken: {tokenValue, tokenValue}}, codes.Unauthenticated},
	}
	appended := metadata.AppendToOutgoingContext(env.context(t, "no credential"), "X-Service-Token", tokenValue)
	_, err := env.call(appended, "Read", ownAccount)
	require.NoError(t, err, "AppendToOutgoingContext with a capitalised key")

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			ctx := metadata.NewOutgoingContext(env.context(t, "no credential"), tt.md)
			_, err := env.call(ctx, "Read", ownAccount)

			assert.Equal(t, tt.want, status.Code(err), "status: %v", err)
			assert.NotContains(t, status.Convert(err).Message(), jwtValue)
			assert.NotContains(t, status.Convert(err).Message(), tokenValue)
		})
	}
}

func TestPolicyMissingFindsUnlistedMethods(t *testing.T) {
	t.Parallel()

	env := startTestServer(t)
	info := env.server.GetServiceInfo()

	assert.Equal(t, []string{"/authtest.Test/Unlisted", healthpb.Health_List_FullMethodName}, testPolicy().Missing(info))

	complete := testPolicy()
	complete["/authtest.Test/Unlisted"] = Rule{Operator: true}
	complete[healthpb.Health_List_FullMethodName] = Rule{Public: true}
	assert.Empty(t, complete.Missing(info))

	complete["/authtest.Test/Removed"] = Rule{Operator: true}
	assert.Equal(t, []string{"/authtest.Test/Removed"}, complete.Unused(info))

	withoutStreams := testPolicy()
	delete(withoutStreams, "/authtest.Test/Upload")
	delete(withoutStreams, "/authtest.Test/Watch")
	assert.Equal(t, []string{"/authtest.Test/Unlisted", "/authtest.Test/Upload", "/authtest.Test/Watch",
		healthpb.Health_List_FullMethodName}, withoutStreams.Missing(info))
}

func TestPolicyValidate(t *testing.T) {
	t.Parallel()

	require.NoError(t, testPolicy().Validate())

	bad := Policy{
		"/authtest.Test/PublicAndScoped": {Public: true, Scopes: []string{ScopeAdmin}},
		"/authtest.Test/Nobody":          {OwnAccount: true},
		"/authtest.Test/BadRole":         {UserRoles: []string{"owner"}},
		"/authtest.Test/BadScope":        {Scopes: []string{"usage-write"}},
		"authtest.Test/NoSlash":          {Operator: true},
		"/authtest.Test":                 {Operator: true},
	}
	err := bad.Validate()
	require.Error(t, err)

	for _, want := range []string{
		"rule for /authtest.Test/PublicAndScoped: a Public rule allows every caller",
		"rule for /authtest.Test/Nobody: the rule allows no caller",
		`rule for /authtest.Test/BadRole: user role "owner" is unknown`,
		`rule for /authtest.Test/BadScope: scope "usage-write" is unknown`,
		`rule for "authtest.Test/NoSlash": method name must be`,
		`rule for "/authtest.Test": method name must be`,
	} {
		assert.ErrorContains(t, err, want)
	}
}

// TestInterceptorsOwnAccountWithoutAccountField checks that OwnAccount on
// a request without account_id denies bound principals.
func TestInterceptorsOwnAccountWithoutAccountField(t *testing.T) {
	t.Parallel()

	policy := Policy{healthpb.Health_Check_FullMethodName: {UserRoles: []string{RoleMember}, OwnAccount: true}}
	unary, _ := Interceptors(newTestAuthenticator(t, testConfig(t, nil)), policy)
	token, err := MintDevJWT(testSecret, testIssuer, testAudience,
		DevClaims{Subject: testUserID, AccountID: ownAccount, Role: RoleMember}, testNow, time.Hour)
	require.NoError(t, err)

	called := false
	_, err = unary(bearer(token), &healthpb.HealthCheckRequest{},
		&grpc.UnaryServerInfo{FullMethod: healthpb.Health_Check_FullMethodName},
		func(context.Context, any) (any, error) { called = true; return nil, nil })

	assert.Equal(t, codes.PermissionDenied, status.Code(err))
	message := status.Convert(err).Message()
	assert.Contains(t, message, "requests of "+healthpb.Health_Check_FullMethodName+" do not name an account")
	assert.NotContains(t, message, "HealthCheckRequest", "the message must not name a Go type")
	assert.NotContains(t, message, "grpc_health_v1", "the message must not name a Go package")
	assert.False(t, called)
}

// recvOnlyStream is a server stream whose RecvMsg receives an empty
// message.
type recvOnlyStream struct {
	grpc.ServerStream
}

func (recvOnlyStream) RecvMsg(any) error {
	return nil
}

// TestAccountCheckedStreamWithoutAccountField checks that a stream method
// with OwnAccount whose requests have no account_id denies bound principals
// with a message that names the method, not a Go type.
func TestAccountCheckedStreamWithoutAccountField(t *testing.T) {
	t.Parallel()

	stream := &accountCheckedStream{
		ServerStream: recvOnlyStream{},
		caller:       principal.Principal{Kind: principal.User, UserID: testUserID, AccountID: ownAccount, Role: RoleMember},
		method:       "/authtest.Test/Upload",
	}

	err := stream.RecvMsg(&healthpb.HealthCheckRequest{})

	assert.Equal(t, codes.PermissionDenied, status.Code(err))
	message := status.Convert(err).Message()
	assert.Contains(t, message, "requests of /authtest.Test/Upload do not name an account")
	assert.NotContains(t, message, "HealthCheckRequest", "the message must not name a Go type")
}

func TestInterceptorsCopyPolicy(t *testing.T) {
	t.Parallel()

	policy := testPolicy()
	unary, _ := Interceptors(newTestAuthenticator(t, testConfig(t, nil)), policy)
	policy["/authtest.Test/Unlisted"] = Rule{Public: true}

	_, err := unary(context.Background(), newAccountMessage(ownAccount),
		&grpc.UnaryServerInfo{FullMethod: "/authtest.Test/Unlisted"},
		func(context.Context, any) (any, error) { return nil, nil })

	assert.Equal(t, codes.PermissionDenied, status.Code(err), "a change after Interceptors must have no effect")
}

// TestInterceptorsManyCalls runs concurrent calls of several principals, so
// that the race detector checks the cache and the last-used queue.
func TestInterceptorsManyCalls(t *testing.T) {
	t.Parallel()

	env := startTestServer(t)
	principals := []string{"member", "worker", "service", "operator"}

	errs := make(chan error, 4*len(principals))
	for i := range 4 * len(principals) {
		go func() {
			name := principals[i%len(principals)]
			_, err := env.call(env.context(t, name), "Read", ownAccount)
			if err != nil {
				err = errors.New(name + " call " + strconv.Itoa(i) + ": " + err.Error())
			}
			errs <- err
		}()
	}
	for range 4 * len(principals) {
		assert.NoError(t, <-errs)
	}
}
