package meteringapi

import (
	"google.golang.org/protobuf/types/known/timestamppb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/metering"
)

var metricNames = map[meteringv1.Metric]metering.Metric{
	meteringv1.Metric_METRIC_AGENTS:        metering.Agents,
	meteringv1.Metric_METRIC_TASKS:         metering.Tasks,
	meteringv1.Metric_METRIC_DOCUMENTS:     metering.Documents,
	meteringv1.Metric_METRIC_MESSAGES:      metering.Messages,
	meteringv1.Metric_METRIC_STORAGE_BYTES: metering.StorageBytes,
}

var metricEnums = invert(metricNames)

var stateNames = map[meteringv1.ReservationState]metering.State{
	meteringv1.ReservationState_RESERVATION_STATE_PENDING:   metering.Pending,
	meteringv1.ReservationState_RESERVATION_STATE_COMMITTED: metering.Committed,
	meteringv1.ReservationState_RESERVATION_STATE_RELEASED:  metering.Released,
	meteringv1.ReservationState_RESERVATION_STATE_EXPIRED:   metering.Expired,
}

var stateEnums = invert(stateNames)

var enforcementNames = map[meteringv1.EnforcementMode]metering.Enforcement{
	meteringv1.EnforcementMode_ENFORCEMENT_MODE_ENFORCE:    metering.Enforce,
	meteringv1.EnforcementMode_ENFORCEMENT_MODE_TRACK_ONLY: metering.TrackOnly,
}

var enforcementEnums = invert(enforcementNames)

var scopeNames = map[meteringv1.LimitScope]metering.Scope{
	meteringv1.LimitScope_LIMIT_SCOPE_ACCOUNT: metering.ScopeAccount,
	meteringv1.LimitScope_LIMIT_SCOPE_PARENT:  metering.ScopeParent,
}

var scopeEnums = invert(scopeNames)

var kindEnums = map[metering.Kind]meteringv1.MetricKind{
	metering.PeriodCounter: meteringv1.MetricKind_METRIC_KIND_PERIOD_COUNTER,
	metering.RunningTotal:  meteringv1.MetricKind_METRIC_KIND_RUNNING_TOTAL,
}

func invert[K, V comparable](m map[K]V) map[V]K {
	out := make(map[V]K, len(m))
	for k, v := range m {
		out[v] = k
	}
	return out
}

// items converts validated items.
func items(in []*meteringv1.UsageItem) []metering.Item {
	out := make([]metering.Item, len(in))
	for i, item := range in {
		out[i] = metering.Item{Metric: metricNames[item.GetMetric()], Amount: item.GetAmount(), ParentID: item.GetParentId()}
	}
	return out
}

func itemsProto(in []metering.Item) []*meteringv1.UsageItem {
	out := make([]*meteringv1.UsageItem, len(in))
	for i, item := range in {
		out[i] = &meteringv1.UsageItem{Metric: metricEnums[item.Metric], Amount: item.Amount, ParentId: item.ParentID}
	}
	return out
}

func reservationProto(r metering.Reservation) *meteringv1.Reservation {
	return &meteringv1.Reservation{
		Id:             r.ID,
		AccountId:      r.AccountID,
		State:          stateEnums[r.State],
		Items:          itemsProto(r.Items),
		CommittedItems: itemsProto(r.CommittedItems),
		ResourceId:     r.ResourceID,
		IdempotencyKey: r.IdempotencyKey,
		CreatedAt:      timestamppb.New(r.CreateTime),
		ExpiresAt:      timestamppb.New(r.ExpireTime),
	}
}

func usageProto(c metering.Counter) *meteringv1.MetricUsage {
	u := &meteringv1.MetricUsage{
		Metric:    metricEnums[c.Metric],
		Scope:     scopeEnums[c.Scope],
		Kind:      kindEnums[c.Kind],
		Used:      c.Used,
		Reserved:  c.Reserved,
		Unlimited: c.Unlimited,
	}
	if c.Scope == metering.ScopeParent {
		u.ParentId = c.ParentID
	}
	if remaining, ok := c.Remaining(); ok {
		u.Limit = c.Limit
		u.Remaining = &remaining
	}
	return u
}

func usagesProto(in []metering.Counter) []*meteringv1.MetricUsage {
	out := make([]*meteringv1.MetricUsage, len(in))
	for i, c := range in {
		out[i] = usageProto(c)
	}
	return out
}

func violationsProto(in []metering.Counter) []*meteringv1.LimitViolation {
	out := make([]*meteringv1.LimitViolation, len(in))
	for i, c := range in {
		v := &meteringv1.LimitViolation{
			Metric:    metricEnums[c.Metric],
			Scope:     scopeEnums[c.Scope],
			Used:      c.Used,
			Reserved:  c.Reserved,
			Requested: c.Requested,
		}
		if c.Limit != nil {
			v.Limit = *c.Limit
		}
		if c.Scope == metering.ScopeParent {
			v.ParentId = c.ParentID
		}
		out[i] = v
	}
	return out
}

func planProto(p metering.Plan) *meteringv1.Plan {
	out := &meteringv1.Plan{
		Id:          p.ID,
		DisplayName: p.DisplayName,
		CreateTime:  timestamppb.New(p.CreateTime),
		UpdateTime:  timestamppb.New(p.UpdateTime),
	}
	for _, l := range p.Limits {
		limit := &meteringv1.Limit{Metric: metricEnums[l.Metric], Scope: scopeEnums[l.Scope]}
		if l.Max == nil {
			limit.Bound = &meteringv1.Limit_Unlimited{Unlimited: true}
		} else {
			limit.Bound = &meteringv1.Limit_Max{Max: *l.Max}
		}
		out.Limits = append(out.Limits, limit)
	}
	return out
}

func accountProto(a metering.Account) *meteringv1.Account {
	return &meteringv1.Account{
		Id:              a.ID,
		PlanId:          a.PlanID,
		BillingAnchor:   timestamppb.New(a.BillingAnchor),
		EnforcementMode: enforcementEnums[a.Enforcement],
		CreateTime:      timestamppb.New(a.CreateTime),
		UpdateTime:      timestamppb.New(a.UpdateTime),
	}
}

func tokenProto(t metering.ServiceTokenInfo) *meteringv1.ServiceToken {
	out := &meteringv1.ServiceToken{
		Id:         t.ID,
		Name:       t.Name,
		AccountId:  t.AccountID,
		AgentId:    t.AgentID,
		Scopes:     t.Scopes,
		CreateTime: timestamppb.New(t.CreateTime),
		CreatedBy:  t.CreatedBy,
	}
	if t.RevokeTime != nil {
		out.RevokeTime = timestamppb.New(*t.RevokeTime)
	}
	if t.LastUseTime != nil {
		out.LastUseTime = timestamppb.New(*t.LastUseTime)
	}
	return out
}
