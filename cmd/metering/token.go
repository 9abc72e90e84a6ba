package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/metering/metering/internal/auth"
	"github.com/metering/metering/internal/metering"
	"github.com/metering/metering/internal/server"
)

const tokenUsage = `Usage:
  metering token jwt -sub USER -account ACCOUNT [-role member|admin] [-ttl 12h] [server flags]
  metering token jwt -sub USER -operator [-ttl 12h] [server flags]
      prints a development JWT signed with the HS256 secret of -jwt-hs256-secret-file
  metering token issue -name NAME -scopes SCOPES [-account ACCOUNT] [-agent AGENT] [server flags]
      stores a service token in the database of -database-url and prints it once

Scopes are a comma-separated list of usage:read, usage:write and admin.
The server flags (see metering -h) give the secret file, issuer, audience and
database, each with its environment variable.

Flags:
`

// runToken runs "metering token jwt" or "metering token issue" and prints
// the credential on standard output.
func runToken(ctx context.Context, args []string, logger *slog.Logger) error {
	if len(args) == 0 || (args[0] != "jwt" && args[0] != "issue") {
		return &usageError{errors.New("metering token needs a subcommand: jwt or issue")}
	}
	kind, args := args[0], args[1:]

	fs := flag.NewFlagSet("metering token", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	subject := fs.String("sub", "", "jwt: the user id (sub claim)")
	account := fs.String("account", "", "the account the user or token is bound to")
	role := fs.String("role", auth.RoleMember, "jwt: the user's role in the account: member or admin")
	operator := fs.Bool("operator", false, "jwt: mint an operator (platform admin) token instead of a user token")
	ttl := fs.Duration("ttl", 12*time.Hour, "jwt: how long the token is valid")
	name := fs.String("name", "", "issue: what the token is for")
	agent := fs.String("agent", "", "issue: the agent a runtime worker's token is bound to")
	scopes := fs.String("scopes", "", "issue: comma-separated scopes: usage:read, usage:write, admin")
	cfg, err := server.ConfigFromFlags(fs, args, os.LookupEnv)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(os.Stdout, tokenUsage)
		fs.SetOutput(os.Stdout)
		fs.PrintDefaults()
		return err
	}
	if err != nil {
		return &usageError{err}
	}

	level := cfg.Level()
	logger = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	if kind == "jwt" {
		return mintJWT(cfg.Auth, auth.DevClaims{Subject: *subject, AccountID: *account, Role: *role, PlatformAdmin: *operator}, *ttl)
	}
	return issueToken(ctx, cfg.DatabaseURL, metering.IssueTokenRequest{
		Name:      *name,
		AccountID: *account,
		AgentID:   *agent,
		Scopes:    splitScopes(*scopes),
		Actor:     "cli:metering-token",
	}, logger)
}

func mintJWT(cfg server.AuthConfig, claims auth.DevClaims, ttl time.Duration) error {
	switch {
	case cfg.JWTSecretFile == "":
		return &usageError{errors.New("-jwt-hs256-secret-file (METERING_JWT_HS256_SECRET_FILE) is required to sign a development JWT")}
	case cfg.JWTIssuer == "" || cfg.JWTAudience == "":
		return &usageError{errors.New("-jwt-issuer and -jwt-audience (METERING_JWT_ISSUER, METERING_JWT_AUDIENCE) are required")}
	case claims.Subject == "":
		return &usageError{errors.New("-sub is required")}
	case !claims.PlatformAdmin && claims.AccountID == "":
		return &usageError{errors.New("-account is required for a user token; use -operator for a platform admin")}
	}

	secret, err := os.ReadFile(cfg.JWTSecretFile)
	if err != nil {
		return fmt.Errorf("read the JWT secret file: %w", err)
	}
	token, err := auth.MintDevJWT([]byte(strings.TrimRight(string(secret), "\r\n")), cfg.JWTIssuer, cfg.JWTAudience, claims, time.Now(), ttl)
	if err != nil {
		return err
	}
	_, err = fmt.Println(token)
	return err
}

func issueToken(ctx context.Context, databaseURL string, req metering.IssueTokenRequest, logger *slog.Logger) error {
	switch {
	case databaseURL == "":
		return &usageError{errors.New("-database-url (DATABASE_URL) is required to store a service token")}
	case req.Name == "":
		return &usageError{errors.New("-name is required")}
	case len(req.Scopes) == 0:
		return &usageError{errors.New("-scopes is required: usage:read, usage:write or admin, comma-separated")}
	}
	for _, scope := range req.Scopes {
		if scope != auth.ScopeUsageRead && scope != auth.ScopeUsageWrite && scope != auth.ScopeAdmin {
			return &usageError{fmt.Errorf("unknown scope %q: must be usage:read, usage:write or admin", scope)}
		}
	}

	pool, err := pgxpool.New(ctx, databaseURL)
	if err != nil {
		return fmt.Errorf("connect to the database: %w", err)
	}
	defer pool.Close()

	svc := metering.New(metering.Config{Pool: pool, Logger: logger})
	info, plaintext, err := svc.IssueServiceToken(ctx, req)
	if err != nil {
		return err
	}
	logger.InfoContext(ctx, "service token issued", "id", info.ID, "name", info.Name, "scopes", info.Scopes)
	_, err = fmt.Println(plaintext)
	return err
}

func splitScopes(s string) []string {
	var out []string
	for scope := range strings.SplitSeq(s, ",") {
		if scope = strings.TrimSpace(scope); scope != "" {
			out = append(out, scope)
		}
	}
	return out
}
