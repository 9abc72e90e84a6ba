package auth

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors"
	grpcauth "github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/auth"
	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/selector"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/metering/metering/internal/principal"
)

// Rule lists the callers allowed to call one method. A principal may call the method when
// its kind is allowed (Operator, UserRoles or Scopes) and, with OwnAccount,
// when the request names its own account.
type Rule struct {
	// Public methods need no credential, as for health checks and
	// reflection. The other fields must be unset.
	Public bool
	// Operator allows operators: JWTs with ClaimPlatformAdmin true.
	Operator bool
	// UserRoles are the user roles (RoleMember, RoleAdmin) that may call.
	// Empty denies users.
	UserRoles []string
	// Scopes allows a service token that has any one of them. Empty denies
	// service tokens.
	Scopes []string
	// OwnAccount requires a principal bound to one account to name that
	// account in the request's account_id field (GetAccountId). Operators
	// and all-accounts service tokens may name any account. In a stream,
	// the first message received must name the account, and every later
	// message must name it or leave account_id empty.
	OwnAccount bool
}

// Policy maps full method names ("/package.Service/Method") to their
// rules. A method without a rule is denied to everyone.
type Policy map[string]Rule

// Missing returns the full names of the methods in info (from
// grpc.Server.GetServiceInfo) that have no rule in p, sorted.
func (p Policy) Missing(info map[string]grpc.ServiceInfo) []string {
	var missing []string
	for service, serviceInfo := range info {
		for _, method := range serviceInfo.Methods {
			name := "/" + service + "/" + method.Name
			if _, ok := p[name]; !ok {
				missing = append(missing, name)
			}
		}
	}
	slices.Sort(missing)

	return missing
}

// Unused returns the methods that have a rule in p but are not in info,
// sorted. A non-empty result usually means a renamed or removed method.
func (p Policy) Unused(info map[string]grpc.ServiceInfo) []string {
	registered := make(map[string]bool)
	for service, serviceInfo := range info {
		for _, method := range serviceInfo.Methods {
			registered["/"+service+"/"+method.Name] = true
		}
	}

	var unused []string
	for name := range p {
		if !registered[name] {
			unused = append(unused, name)
		}
	}
	slices.Sort(unused)

	return unused
}

// Validate checks every rule of p and returns every problem found, joined
// with errors.Join, or nil. Problems are a method name that is not
// "/service/method", a public rule that sets other fields, a rule that
// allows no caller, and an unknown role or scope. The known scopes are
// those of Scopes.
func (p Policy) Validate() error {
	return p.ValidateWithScopes(Scopes())
}

// ValidateWithScopes checks p as Validate does, with known as the scopes
// that rules may name. A server whose service tokens carry scopes of its
// own, such as a resource service with its runtime tokens, passes those.
func (p Policy) ValidateWithScopes(known []string) error {
	var errs []error
	for _, method := range slices.Sorted(maps.Keys(p)) {
		if err := p[method].validate(known); err != nil {
			errs = append(errs, fmt.Errorf("rule for %s: %w", method, err))
		}
		if !validMethodName(method) {
			errs = append(errs, fmt.Errorf("rule for %q: method name must be \"/package.Service/Method\"", method))
		}
	}

	return errors.Join(errs...)
}

func (r Rule) validate(knownScopes []string) error {
	if r.Public {
		if r.Operator || len(r.UserRoles) > 0 || len(r.Scopes) > 0 || r.OwnAccount {
			return errors.New("a Public rule allows every caller, so Operator, UserRoles, Scopes and OwnAccount must be unset")
		}

		return nil
	}

	var errs []error
	if !r.Operator && len(r.UserRoles) == 0 && len(r.Scopes) == 0 {
		errs = append(errs, errors.New("the rule allows no caller: set Operator, UserRoles or Scopes"))
	}
	for _, role := range r.UserRoles {
		if role != RoleMember && role != RoleAdmin {
			errs = append(errs, fmt.Errorf("user role %q is unknown; roles are %q and %q", role, RoleMember, RoleAdmin))
		}
	}
	for _, scope := range r.Scopes {
		if !slices.Contains(knownScopes, scope) {
			errs = append(errs, fmt.Errorf("scope %q is unknown; scopes are %s", scope, strings.Join(knownScopes, ", ")))
		}
	}

	return errors.Join(errs...)
}

func validMethodName(name string) bool {
	service, method, ok := strings.Cut(strings.TrimPrefix(name, "/"), "/")

	return strings.HasPrefix(name, "/") && ok && service != "" && method != "" && !strings.Contains(method, "/")
}

// Interceptors returns the unary and stream server interceptors that
// enforce p, authenticating callers with a. Each runs three steps:
//
//  1. A method without a rule in p is rejected with PermissionDenied,
//     before any credential is read.
//  2. Unless the rule is Public, the go-grpc-middleware auth interceptor
//     calls a.Authenticate. The selector interceptor skips this step for
//     public methods.
//  3. Unless the rule is Public, the principal must be allowed by the rule,
//     and with OwnAccount the request must name the principal's account.
//     Failures return PermissionDenied.
//
// Interceptors copies p, so later changes to p have no effect. It does not
// validate p: call p.Validate and p.Missing at start-up. A service that
// implements the go-grpc-middleware ServiceAuthFuncOverride interface
// replaces step 2 with its own function, so services must not implement it.
func Interceptors(a *Authenticator, p Policy) (grpc.UnaryServerInterceptor, grpc.StreamServerInterceptor) {
	p = maps.Clone(p)
	needsAuthentication := selector.MatchFunc(func(_ context.Context, call interceptors.CallMeta) bool {
		return !p[call.FullMethod()].Public
	})

	unary := chainUnary(
		p.requireRuleUnary,
		selector.UnaryServerInterceptor(grpcauth.UnaryServerInterceptor(a.Authenticate), needsAuthentication),
		p.authorizeUnary,
	)
	stream := chainStream(
		p.requireRuleStream,
		selector.StreamServerInterceptor(grpcauth.StreamServerInterceptor(a.Authenticate), needsAuthentication),
		p.authorizeStream,
	)

	return unary, stream
}

// noRuleError is the error for a method that has no rule.
func noRuleError(method string) error {
	return status.Errorf(codes.PermissionDenied, "method %s has no access rule; methods not in the policy are denied", method)
}

func (p Policy) requireRuleUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if _, ok := p[info.FullMethod]; !ok {
		return nil, noRuleError(info.FullMethod)
	}

	return handler(ctx, req)
}

func (p Policy) requireRuleStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if _, ok := p[info.FullMethod]; !ok {
		return noRuleError(info.FullMethod)
	}

	return handler(srv, ss)
}

func (p Policy) authorizeUnary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	rule := p[info.FullMethod]
	if rule.Public {
		return handler(ctx, req)
	}

	caller, err := rule.authorize(ctx, info.FullMethod)
	if err != nil {
		return nil, err
	}
	if rule.OwnAccount && caller.BoundToAccount() {
		if err := checkAccount(caller, info.FullMethod, req, true); err != nil {
			return nil, err
		}
	}

	return handler(ctx, req)
}

func (p Policy) authorizeStream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	rule := p[info.FullMethod]
	if rule.Public {
		return handler(srv, ss)
	}

	caller, err := rule.authorize(ss.Context(), info.FullMethod)
	if err != nil {
		return err
	}
	if rule.OwnAccount && caller.BoundToAccount() {
		ss = &accountCheckedStream{ServerStream: ss, caller: caller, method: info.FullMethod}
	}

	return handler(srv, ss)
}

// authorize returns the principal in ctx when r allows it to call method,
// and a status error otherwise.
func (r Rule) authorize(ctx context.Context, method string) (principal.Principal, error) {
	caller, ok := principal.FromContext(ctx)
	if !ok {
		return principal.Principal{}, status.Errorf(codes.Unauthenticated, "no credential was verified for %s", method)
	}

	switch caller.Kind {
	case principal.Operator:
		if r.Operator {
			return caller, nil
		}

		return principal.Principal{}, status.Errorf(codes.PermissionDenied, "operators may not call %s", method)
	case principal.User:
		if slices.Contains(r.UserRoles, caller.Role) {
			return caller, nil
		}

		return principal.Principal{}, status.Errorf(codes.PermissionDenied, "users with role %q may not call %s", caller.Role, method)
	case principal.Service:
		if len(r.Scopes) == 0 {
			return principal.Principal{}, status.Errorf(codes.PermissionDenied, "service tokens may not call %s", method)
		}
		if slices.ContainsFunc(r.Scopes, caller.HasScope) {
			return caller, nil
		}

		return principal.Principal{}, status.Errorf(codes.PermissionDenied,
			"service token %s may not call %s: it needs one of the scopes %s", caller.TokenID, method, strings.Join(r.Scopes, ", "))
	default:
		return principal.Principal{}, status.Errorf(codes.Unauthenticated, "no credential was verified for %s", method)
	}
}

// accountRequest is a request message with an account_id field.
type accountRequest interface {
	GetAccountId() string
}

// checkAccount returns PermissionDenied unless msg, a request of method,
// names caller's account. An empty account_id is accepted only when
// emptyDenied is false.
func checkAccount(caller principal.Principal, method string, msg any, emptyDenied bool) error {
	request, ok := msg.(accountRequest)
	if !ok {
		// NOTE: this is a policy error (OwnAccount on a message without
		// account_id), denied so that it cannot open another account.
		return status.Errorf(codes.PermissionDenied,
			"requests of %s do not name an account, so a caller bound to one account may not call it", method)
	}

	account := request.GetAccountId()
	switch {
	case account == "" && emptyDenied:
		return status.Errorf(codes.PermissionDenied, "request account_id is empty; this caller may act only on account %q", caller.AccountID)
	case account == "":
		return nil
	case account != caller.AccountID:
		return status.Errorf(codes.PermissionDenied, "account %q is not the caller's account", account)
	default:
		return nil
	}
}

// accountCheckedStream checks the account of every message received on a
// stream of a principal bound to one account. After a denied message, every
// later RecvMsg returns the same error.
type accountCheckedStream struct {
	grpc.ServerStream
	caller   principal.Principal
	method   string
	received bool
	denied   error
}

// RecvMsg receives the next message into m and checks its account_id: the
// first message must name the caller's account, later ones must name it or
// leave it empty.
func (s *accountCheckedStream) RecvMsg(m any) error {
	if s.denied != nil {
		return s.denied
	}
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}

	first := !s.received
	s.received = true
	if err := checkAccount(s.caller, s.method, m, first); err != nil {
		s.denied = err
		return err
	}

	return nil
}

// chainUnary returns an interceptor that runs interceptors in order, the
// first outermost.
func chainUnary(interceptors ...grpc.UnaryServerInterceptor) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		next := handler
		for i := len(interceptors) - 1; i >= 0; i-- {
			interceptor, inner := interceptors[i], next
			next = func(ctx context.Context, req any) (any, error) {
				return interceptor(ctx, req, info, inner)
			}
		}

		return next(ctx, req)
	}
}

// chainStream returns an interceptor that runs interceptors in order, the
// first outermost.
func chainStream(interceptors ...grpc.StreamServerInterceptor) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		next := handler
		for i := len(interceptors) - 1; i >= 0; i-- {
			interceptor, inner := interceptors[i], next
			next = func(srv any, ss grpc.ServerStream) error {
				return interceptor(srv, ss, info, inner)
			}
		}

		return next(srv, ss)
	}
}
