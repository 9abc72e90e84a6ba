package main

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/auth"
)

// Names of the service tokens that devstack issues. Each start revokes the
// tokens of earlier starts with the same names.
const (
	workspaceTokenName = "devstack-workspace"
	operatorTokenName  = "devstack-operator"
)

// userJWTTTL is how long the printed user JWT is valid.
const userJWTTTL = 12 * time.Hour

// readyTimeout bounds the wait for Metering to serve.
const readyTimeout = 30 * time.Second

// credentials are the service tokens and the user JWT that bootstrap issues.
type credentials struct {
	workspaceToken string
	operatorToken  string
	userJWT        string
}

// exports returns shell exports of the credentials a newcomer uses.
func (c credentials) exports() string {
	return fmt.Sprintf("export OPERATOR_TOKEN=%s\nexport USER_JWT=%s\n", c.operatorToken, c.userJWT)
}

// bootstrap waits until Metering at addr serves, then, as an operator with a
// JWT signed with secret, revokes the tokens of earlier starts, issues the
// workspace's token and an operator token, and puts cfg.account on cfg.plan
// unless the account exists. It also mints the user's JWT.
func bootstrap(ctx context.Context, cfg config, addr string, secret []byte) (credentials, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return credentials{}, fmt.Errorf("connect to Metering: %w", err)
	}
	defer conn.Close()

	now := time.Now()
	operatorJWT, err := auth.MintDevJWT(secret, cfg.jwtIssuer, cfg.jwtAudience, auth.DevClaims{Subject: "devstack", PlatformAdmin: true}, now, time.Hour)
	if err != nil {
		return credentials{}, err
	}
	ctx = metadata.AppendToOutgoingContext(ctx, auth.MetadataAuthorization, "Bearer "+operatorJWT)

	if err := waitForMetering(ctx, healthpb.NewHealthClient(conn)); err != nil {
		return credentials{}, err
	}

	admin := meteringv1.NewMeteringAdminServiceClient(conn)
	if err := revokeEarlierTokens(ctx, admin); err != nil {
		return credentials{}, err
	}

	var creds credentials
	if creds.workspaceToken, err = issueToken(ctx, admin, workspaceTokenName, auth.ScopeUsageWrite); err != nil {
		return credentials{}, err
	}
	if creds.operatorToken, err = issueToken(ctx, admin, operatorTokenName, auth.ScopeAdmin); err != nil {
		return credentials{}, err
	}
	if err := ensureAccount(ctx, admin, cfg.account, cfg.plan); err != nil {
		return credentials{}, err
	}

	creds.userJWT, err = auth.MintDevJWT(secret, cfg.jwtIssuer, cfg.jwtAudience,
		auth.DevClaims{Subject: cfg.user, AccountID: cfg.account, Role: auth.RoleMember}, now, userJWTTTL)
	if err != nil {
		return credentials{}, err
	}

	return creds, nil
}

// waitForMetering waits until Metering's health status is SERVING, which it
// is once a PostgreSQL ping succeeds.
func waitForMetering(ctx context.Context, health healthpb.HealthClient) error {
	ctx, cancel := context.WithTimeout(ctx, readyTimeout)
	defer cancel()

	for {
		resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}

		select {
		case <-ctx.Done():
			return fmt.Errorf("Metering did not become ready within %s: %w", readyTimeout, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func revokeEarlierTokens(ctx context.Context, admin meteringv1.MeteringAdminServiceClient) error {
	list, err := admin.ListServiceTokens(ctx, &meteringv1.ListServiceTokensRequest{})
	if err != nil {
		return fmt.Errorf("list service tokens: %w", err)
	}

	for _, token := range list.GetTokens() {
		if !slices.Contains([]string{workspaceTokenName, operatorTokenName}, token.GetName()) {
			continue
		}
		if _, err := admin.RevokeServiceToken(ctx, &meteringv1.RevokeServiceTokenRequest{Id: token.GetId()}); err != nil {
			return fmt.Errorf("revoke service token %s of an earlier start: %w", token.GetId(), err)
		}
	}

	return nil
}

func issueToken(ctx context.Context, admin meteringv1.MeteringAdminServiceClient, name, scope string) (string, error) {
	resp, err := admin.IssueServiceToken(ctx, &meteringv1.IssueServiceTokenRequest{Name: name, Scopes: []string{scope}})
	if err != nil {
		return "", fmt.Errorf("issue service token %s: %w", name, err)
	}

	return resp.GetPlaintext(), nil
}

// ensureAccount puts account on plan unless the account exists, so a plan
// chosen in the walkthrough survives a restart.
func ensureAccount(ctx context.Context, admin meteringv1.MeteringAdminServiceClient, account, plan string) error {
	_, err := admin.GetAccount(ctx, &meteringv1.GetAccountRequest{AccountId: account})
	if status.Code(err) != codes.NotFound {
		if err != nil {
			return fmt.Errorf("get account %s: %w", account, err)
		}
		return nil
	}

	if _, err := admin.SetAccountPlan(ctx, &meteringv1.SetAccountPlanRequest{AccountId: account, PlanId: plan}); err != nil {
		return fmt.Errorf("put account %s on plan %s: %w", account, plan, err)
	}

	return nil
}

// addresses are the gRPC addresses of the running servers.
type addresses struct {
	metering  string
	workspace string
}

// printWelcome prints the addresses, the credentials and example commands.
func printWelcome(w io.Writer, cfg config, addrs addresses, creds credentials, envFile string) {
	var b strings.Builder
	fmt.Fprintf(&b, "\nMetering serves gRPC on %s, the workspace server on %s.\n", addrs.metering, addrs.workspace)
	fmt.Fprintf(&b, "Account %s exists; %s is a member. Credentials (also in %s, for `source` in another shell):\n\n", cfg.account, cfg.user, envFile)
	b.WriteString(creds.exports())
	fmt.Fprintf(&b, `
As %[1]s, create an agent and keep its runtime token, then read the usage:

  RUNTIME_TOKEN=$(grpcurl -plaintext -H "authorization: Bearer $USER_JWT" \
    -d '{"account_id": "%[2]s", "name": "helper"}' %[3]s workspace.v1.AgentService/CreateAgent | jq -r .runtimeToken)
  grpcurl -plaintext -emit-defaults -H "authorization: Bearer $USER_JWT" -d '{"account_id": "%[2]s"}' \
    %[4]s metering.v1.MeteringService/GetCurrentUsage

As the agent's runtime worker, create a task:

  grpcurl -plaintext -H "x-service-token: $RUNTIME_TOKEN" -d '{"account_id": "%[2]s", "title": "First task"}' \
    %[3]s workspace.v1.TaskService/CreateTask

Press Ctrl-C to stop both servers.
`, cfg.user, cfg.account, addrs.workspace, addrs.metering)

	_, _ = io.WriteString(w, b.String())
}
