package meteringapi

import (
	"context"
	"fmt"

	"google.golang.org/protobuf/types/known/timestamppb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/metering"
)

// adminServer implements MeteringAdminService.
type adminServer struct {
	meteringv1.UnimplementedMeteringAdminServiceServer
	api *API
}

func (s *adminServer) UpsertPlan(ctx context.Context, req *meteringv1.UpsertPlanRequest) (*meteringv1.UpsertPlanResponse, error) {
	plan, err := validatePlan(req.GetPlan())
	if err != nil {
		return nil, err
	}

	saved, created, err := s.api.svc.UpsertPlan(ctx, plan)
	if err != nil {
		return nil, s.api.toStatus(ctx, "", err)
	}
	return &meteringv1.UpsertPlanResponse{Plan: planProto(saved), Created: created}, nil
}

// validatePlan checks a plan and converts it: a valid id, and exactly one
// limit for every metric and scope of metering.RequiredLimits.
func validatePlan(p *meteringv1.Plan) (metering.Plan, error) {
	var v violations
	if p == nil {
		v.add("plan", "is required")
		return metering.Plan{}, v.err()
	}
	if !planIDPattern.MatchString(p.GetId()) {
		v.add("plan.id", "must be 1 to 64 lowercase letters, digits, '-' or '_', starting with a letter or digit")
	}
	v.text("plan.display_name", p.GetDisplayName(), false, MaxDisplayNameLength)

	out := metering.Plan{ID: p.GetId(), DisplayName: p.GetDisplayName()}
	if out.DisplayName == "" {
		out.DisplayName = out.ID
	}
	type key struct {
		metric metering.Metric
		scope  metering.Scope
	}
	seen := make(map[key]int)
	for i, l := range p.GetLimits() {
		field := fmt.Sprintf("plan.limits[%d]", i)
		info, known := v.metric(field+".metric", l.GetMetric())
		scope, scopeKnown := scopeNames[l.GetScope()]
		if !scopeKnown {
			v.add(field+".scope", "must be LIMIT_SCOPE_ACCOUNT or LIMIT_SCOPE_PARENT, got %s", l.GetScope())
		}
		if known && scope == metering.ScopeParent && info.ParentKind == "" {
			v.add(field+".scope", "must be LIMIT_SCOPE_ACCOUNT: metric %s has no per-parent limit", l.GetMetric())
		}

		limit := metering.Limit{Metric: info.Metric, Scope: scope}
		switch bound := l.GetBound().(type) {
		case *meteringv1.Limit_Max:
			if bound.Max < 0 {
				v.add(field+".max", "must not be negative, got %d", bound.Max)
			}
			limit.Max = &bound.Max
		case *meteringv1.Limit_Unlimited:
			if !bound.Unlimited {
				v.add(field+".unlimited", "must be true when set; set max for a finite limit")
			}
		default:
			v.add(field, "must set max or unlimited")
		}

		if known && scopeKnown {
			k := key{info.Metric, scope}
			if first, dup := seen[k]; dup {
				v.add(field, "must not repeat the metric and scope of plan.limits[%d]", first)
			}
			seen[k] = i
		}
		out.Limits = append(out.Limits, limit)
	}
	for _, required := range metering.RequiredLimits() {
		if _, ok := seen[key{required.Metric, required.Scope}]; !ok && len(v.list) == 0 {
			v.add("plan.limits", "must contain a limit for metric %s scope %s", metricEnums[required.Metric], scopeEnums[required.Scope])
		}
	}
	if err := v.err(); err != nil {
		return metering.Plan{}, err
	}
	return out, nil
}

func (s *adminServer) ListPlans(ctx context.Context, _ *meteringv1.ListPlansRequest) (*meteringv1.ListPlansResponse, error) {
	plans, err := s.api.svc.ListPlans(ctx)
	if err != nil {
		return nil, s.api.toStatus(ctx, "", err)
	}

	out := &meteringv1.ListPlansResponse{}
	for _, p := range plans {
		out.Plans = append(out.Plans, planProto(p))
	}
	return out, nil
}

func (s *adminServer) SetAccountPlan(ctx context.Context, req *meteringv1.SetAccountPlanRequest) (*meteringv1.SetAccountPlanResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	if !planIDPattern.MatchString(req.GetPlanId()) {
		v.add("plan_id", "must be the id of a plan: 1 to 64 lowercase letters, digits, '-' or '_'")
	}
	in := metering.SetAccountRequest{AccountID: req.GetAccountId(), PlanID: req.GetPlanId()}
	if req.GetBillingAnchor() != nil {
		if err := req.GetBillingAnchor().CheckValid(); err != nil {
			v.add("billing_anchor", "must be a valid timestamp: %v", err)
		}
		anchor := req.GetBillingAnchor().AsTime()
		in.BillingAnchor = &anchor
	}
	if mode := req.GetEnforcementMode(); mode != meteringv1.EnforcementMode_ENFORCEMENT_MODE_UNSPECIFIED {
		name, ok := enforcementNames[mode]
		if !ok {
			v.add("enforcement_mode", "must be ENFORCEMENT_MODE_ENFORCE or ENFORCEMENT_MODE_TRACK_ONLY, got %s", mode)
		}
		in.Enforcement = name
	}
	if err := v.err(); err != nil {
		return nil, err
	}

	account, created, err := s.api.svc.SetAccountPlan(ctx, in)
	if err != nil {
		return nil, s.api.toStatus(ctx, req.GetAccountId(), err)
	}
	return &meteringv1.SetAccountPlanResponse{Account: accountProto(account), Created: created}, nil
}

func (s *adminServer) GetAccount(ctx context.Context, req *meteringv1.GetAccountRequest) (*meteringv1.GetAccountResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	if err := v.err(); err != nil {
		return nil, err
	}

	account, period, err := s.api.svc.GetAccount(ctx, req.GetAccountId())
	if err != nil {
		return nil, s.api.toStatus(ctx, req.GetAccountId(), err)
	}
	return &meteringv1.GetAccountResponse{
		Account:     accountProto(account),
		PeriodStart: timestamppb.New(period.Start),
		PeriodEnd:   timestamppb.New(period.End),
	}, nil
}

func (s *adminServer) ListReservations(ctx context.Context, req *meteringv1.ListReservationsRequest) (*meteringv1.ListReservationsResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	in := metering.ListReservationsRequest{AccountID: req.GetAccountId(), PageSize: int(req.GetPageSize()), PageToken: req.GetPageToken()}
	switch size := req.GetPageSize(); {
	case size < 0 || size > MaxPageSize:
		v.add("page_size", "must be between 0 and %d, got %d", MaxPageSize, size)
	case size == 0:
		in.PageSize = DefaultPageSize
	}
	for i, st := range req.GetStates() {
		name, ok := stateNames[st]
		if !ok {
			v.add(fmt.Sprintf("states[%d]", i), "must be a reservation state other than RESERVATION_STATE_UNSPECIFIED, got %s", st)
		}
		in.States = append(in.States, name)
	}
	v.text("page_token", req.GetPageToken(), false, 512)
	if err := v.err(); err != nil {
		return nil, err
	}

	list, next, err := s.api.svc.ListReservations(ctx, in)
	if err != nil {
		return nil, s.api.toStatus(ctx, req.GetAccountId(), err)
	}

	out := &meteringv1.ListReservationsResponse{NextPageToken: next}
	for _, r := range list {
		out.Reservations = append(out.Reservations, reservationProto(r))
	}
	return out, nil
}

func (s *adminServer) AdjustUsage(ctx context.Context, req *meteringv1.AdjustUsageRequest) (*meteringv1.AdjustUsageResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	info, known := v.metric("metric", req.GetMetric())
	v.parent("parent_id", req.GetParentId(), info, known)
	if req.GetDelta() == 0 {
		v.add("delta", "must not be zero")
	}
	v.text("reason", req.GetReason(), true, MaxReasonLength)
	v.optionalID("idempotency_key", req.GetIdempotencyKey())
	if err := v.err(); err != nil {
		return nil, err
	}

	in := metering.AdjustRequest{
		AccountID:      req.GetAccountId(),
		Metric:         info.Metric,
		ParentID:       req.GetParentId(),
		Delta:          req.GetDelta(),
		Reason:         req.GetReason(),
		IdempotencyKey: req.GetIdempotencyKey(),
		Actor:          actor(ctx),
	}
	if in.IdempotencyKey != "" {
		in.RequestHash = requestHash(meteringv1.MeteringAdminService_AdjustUsage_FullMethodName, req)
	}
	res, err := s.api.svc.AdjustUsage(ctx, in)
	if err != nil {
		return nil, s.api.toStatus(ctx, req.GetAccountId(), err)
	}
	return &meteringv1.AdjustUsageResponse{Usage: usageProto(res.Counter), Replayed: res.Replayed}, nil
}

func (s *adminServer) IssueServiceToken(ctx context.Context, req *meteringv1.IssueServiceTokenRequest) (*meteringv1.IssueServiceTokenResponse, error) {
	var v violations
	v.text("name", req.GetName(), true, MaxDisplayNameLength)
	v.optionalID("account_id", req.GetAccountId())
	v.optionalID("agent_id", req.GetAgentId())
	if req.GetAgentId() != "" && req.GetAccountId() == "" {
		v.add("agent_id", "requires account_id: an agent belongs to one account")
	}
	v.scopes(req.GetScopes(), req.GetAccountId() != "")
	if err := v.err(); err != nil {
		return nil, err
	}

	info, plaintext, err := s.api.svc.IssueServiceToken(ctx, metering.IssueTokenRequest{
		Name:      req.GetName(),
		AccountID: req.GetAccountId(),
		AgentID:   req.GetAgentId(),
		Scopes:    req.GetScopes(),
		Actor:     actor(ctx),
	})
	if err != nil {
		return nil, s.api.toStatus(ctx, req.GetAccountId(), err)
	}
	return &meteringv1.IssueServiceTokenResponse{Token: tokenProto(info), Plaintext: plaintext}, nil
}

func (s *adminServer) ListServiceTokens(ctx context.Context, req *meteringv1.ListServiceTokensRequest) (*meteringv1.ListServiceTokensResponse, error) {
	var v violations
	v.optionalID("account_id", req.GetAccountId())
	if err := v.err(); err != nil {
		return nil, err
	}

	tokens, err := s.api.svc.ListServiceTokens(ctx, req.GetAccountId(), req.GetIncludeRevoked())
	if err != nil {
		return nil, s.api.toStatus(ctx, req.GetAccountId(), err)
	}
	out := &meteringv1.ListServiceTokensResponse{}
	for _, t := range tokens {
		out.Tokens = append(out.Tokens, tokenProto(t))
	}
	return out, nil
}

func (s *adminServer) RevokeServiceToken(ctx context.Context, req *meteringv1.RevokeServiceTokenRequest) (*meteringv1.RevokeServiceTokenResponse, error) {
	var v violations
	v.id("id", req.GetId())
	if err := v.err(); err != nil {
		return nil, err
	}

	t, err := s.api.svc.RevokeServiceToken(ctx, req.GetId())
	if err != nil {
		return nil, s.api.toStatus(ctx, "", err)
	}
	return &meteringv1.RevokeServiceTokenResponse{Token: tokenProto(t)}, nil
}
