package meteringapi

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/metering"
)

// meteringServer implements MeteringService.
type meteringServer struct {
	meteringv1.UnimplementedMeteringServiceServer
	api *API
}

func (s *meteringServer) CheckAndReserve(ctx context.Context, req *meteringv1.CheckAndReserveRequest) (*meteringv1.CheckAndReserveResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.usageItems(req.GetItems())
	v.optionalID("idempotency_key", req.GetIdempotencyKey())
	v.ttl(req.GetTtl())
	v.optionalID("resource_id", req.GetResourceId())
	if err := v.err(); err != nil {
		return nil, err
	}

	in := metering.ReserveRequest{
		AccountID:      req.GetAccountId(),
		Items:          items(req.GetItems()),
		IdempotencyKey: req.GetIdempotencyKey(),
		TTL:            req.GetTtl().AsDuration(),
		ResourceID:     req.GetResourceId(),
		Actor:          actor(ctx),
	}
	if in.IdempotencyKey != "" {
		// A zero TTL means the default, as an unset one does, so both hash
		// the same.
		hashed := req
		if req.GetTtl() != nil && req.GetTtl().AsDuration() == 0 {
			hashed = proto.CloneOf(req)
			hashed.Ttl = nil
		}
		in.RequestHash = requestHash(meteringv1.MeteringService_CheckAndReserve_FullMethodName, hashed)
	}
	res, err := s.api.svc.Reserve(ctx, in)
	s.api.countReserve(in.Items, res, err)
	if err != nil {
		return nil, s.api.toStatus(ctx, req.GetAccountId(), err)
	}

	return &meteringv1.CheckAndReserveResponse{
		Reservation: reservationProto(res.Reservation),
		Usage:       usagesProto(res.Usage),
		WouldExceed: violationsProto(res.WouldExceed),
		Replayed:    res.Replayed,
	}, nil
}

// countReserve counts a CheckAndReserve outcome for each requested metric.
func (a *API) countReserve(list []metering.Item, res metering.ReserveResult, err error) {
	over := make(map[metering.Metric]bool)
	for _, c := range res.WouldExceed {
		over[c.Metric] = true
	}
	rejected := false
	if err != nil {
		// Inside the branch, so that a call without error does not move
		// limitErr to the heap.
		var limitErr *metering.LimitError
		rejected = errors.As(err, &limitErr)
	}
	for _, item := range list {
		outcome := "granted"
		switch {
		case rejected:
			outcome = "rejected"
		case err != nil:
			outcome = "error"
		case res.Replayed:
			outcome = "replayed"
		case over[item.Metric]:
			outcome = "over_limit_tracked"
		}
		a.outcomes.WithLabelValues(string(item.Metric), outcome).Inc()
	}
}

func (s *meteringServer) Commit(ctx context.Context, req *meteringv1.CommitRequest) (*meteringv1.CommitResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.uuid("reservation_id", req.GetReservationId())
	v.optionalID("resource_id", req.GetResourceId())
	type key struct {
		metric meteringv1.Metric
		parent string
	}
	seen := make(map[key]int)
	for i, item := range req.GetActualItems() {
		field := fmt.Sprintf("actual_items[%d]", i)
		info, known := v.metric(field+".metric", item.GetMetric())
		if item.GetAmount() < 0 {
			v.add(field+".amount", "must not be negative, got %d", item.GetAmount())
		}
		v.parent(field+".parent_id", item.GetParentId(), info, known)
		k := key{item.GetMetric(), item.GetParentId()}
		if first, dup := seen[k]; dup {
			v.add(field, "must not repeat the metric and parent of actual_items[%d]", first)
		}
		seen[k] = i
	}
	if err := v.err(); err != nil {
		return nil, err
	}

	res, err := s.api.svc.Commit(ctx, metering.CommitRequest{
		AccountID:     req.GetAccountId(),
		ReservationID: req.GetReservationId(),
		Actual:        items(req.GetActualItems()),
		ResourceID:    req.GetResourceId(),
		Actor:         actor(ctx),
	})
	if err != nil {
		return nil, s.api.toStatus(ctx, req.GetAccountId(), err)
	}

	return &meteringv1.CommitResponse{
		Reservation: reservationProto(res.Reservation),
		Usage:       usagesProto(res.Usage),
		Replayed:    res.Replayed,
	}, nil
}

func (s *meteringServer) Release(ctx context.Context, req *meteringv1.ReleaseRequest) (*meteringv1.ReleaseResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.uuid("reservation_id", req.GetReservationId())
	if err := v.err(); err != nil {
		return nil, err
	}

	res, err := s.api.svc.Release(ctx, req.GetAccountId(), req.GetReservationId())
	if err != nil {
		return nil, s.api.toStatus(ctx, req.GetAccountId(), err)
	}
	return &meteringv1.ReleaseResponse{Reservation: reservationProto(res)}, nil
}

func (s *meteringServer) RecordUsage(ctx context.Context, req *meteringv1.RecordUsageRequest) (*meteringv1.RecordUsageResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.usageItems(req.GetItems())
	v.optionalID("idempotency_key", req.GetIdempotencyKey())
	v.optionalID("resource_id", req.GetResourceId())
	list := items(req.GetItems())
	if req.GetResourceId() == "" && len(v.list) == 0 {
		for i, item := range list {
			info, _ := metering.Info(item.Metric)
			if info.AccountKind == metering.RunningTotal || (item.ParentID != "" && info.ParentKind == metering.RunningTotal) {
				v.add("resource_id", "is required because items[%d] adds to the running total of %s, which a deletion must lower", i, item.Metric)
				break
			}
		}
	}
	if err := v.err(); err != nil {
		return nil, err
	}

	in := metering.RecordRequest{
		AccountID:      req.GetAccountId(),
		Items:          list,
		IdempotencyKey: req.GetIdempotencyKey(),
		ResourceID:     req.GetResourceId(),
		Actor:          actor(ctx),
	}
	if in.IdempotencyKey != "" {
		in.RequestHash = requestHash(meteringv1.MeteringService_RecordUsage_FullMethodName, req)
	}
	res, err := s.api.svc.RecordUsage(ctx, in)
	if err != nil {
		return nil, s.api.toStatus(ctx, req.GetAccountId(), err)
	}

	return &meteringv1.RecordUsageResponse{
		Usage:    usagesProto(res.Usage),
		Exceeded: violationsProto(res.Exceeded),
		Replayed: res.Replayed,
	}, nil
}

func (s *meteringServer) RecordDeletion(ctx context.Context, req *meteringv1.RecordDeletionRequest) (*meteringv1.RecordDeletionResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	info, known := v.metric("metric", req.GetMetric())
	if known && !info.HasRunningTotal() {
		v.add("metric", "must have a running total: %s is a period counter, which deletions do not lower", req.GetMetric())
	}
	v.id("resource_id", req.GetResourceId())
	if err := v.err(); err != nil {
		return nil, err
	}

	res, err := s.api.svc.RecordDeletion(ctx, req.GetAccountId(), info.Metric, req.GetResourceId(), actor(ctx))
	if err != nil {
		return nil, s.api.toStatus(ctx, req.GetAccountId(), err)
	}

	return &meteringv1.RecordDeletionResponse{
		Subtracted: res.Subtracted,
		ParentId:   res.ParentID,
		Usage:      usagesProto(res.Usage),
		Replayed:   res.Replayed,
	}, nil
}

func (s *meteringServer) GetCurrentUsage(ctx context.Context, req *meteringv1.GetCurrentUsageRequest) (*meteringv1.GetCurrentUsageResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.optionalID("parent_id", req.GetParentId())
	if err := v.err(); err != nil {
		return nil, err
	}

	u, err := s.api.svc.CurrentUsage(ctx, req.GetAccountId(), req.GetParentId())
	if err != nil {
		return nil, s.api.toStatus(ctx, req.GetAccountId(), err)
	}

	return &meteringv1.GetCurrentUsageResponse{
		AccountId:       u.AccountID,
		PlanId:          u.PlanID,
		EnforcementMode: enforcementEnums[u.Enforcement],
		PeriodStart:     timestamppb.New(u.Period.Start),
		PeriodEnd:       timestamppb.New(u.Period.End),
		Usage:           usagesProto(u.Counters),
	}, nil
}
