package meteringapi

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/metering/metering/internal/metering"
)

// errorDomain is the google.rpc.ErrorInfo domain of Metering's errors.
const errorDomain = "metering"

// ErrorInfo reasons besides those of metering.StateError.
const (
	ReasonPlanLimitExceeded   = "PLAN_LIMIT_EXCEEDED"
	ReasonParentLimitExceeded = "PARENT_LIMIT_EXCEEDED"
	ReasonKeyReused           = "IDEMPOTENCY_KEY_REUSED"
	ReasonResourceCounted     = "RESOURCE_ALREADY_COUNTED"
)

// toStatus maps an error of the metering package to a gRPC status. It is the
// only place that chooses status codes for domain errors. accountID names the
// request's account in error details. Errors it does not
// know are logged and become INTERNAL with a generic message.
func (a *API) toStatus(ctx context.Context, accountID string, err error) error {
	var (
		limitErr   *metering.LimitError
		stateErr   *metering.StateError
		invalidErr *metering.InvalidError
		keyErr     *metering.KeyReusedError
		countedErr *metering.ResourceCountedError
	)

	switch {
	case errors.As(err, &limitErr):
		return a.limitStatus(ctx, accountID, limitErr)
	case errors.As(err, &stateErr):
		info := &errdetails.ErrorInfo{Reason: stateErr.Reason, Domain: errorDomain}
		if len(stateErr.Violations) > 0 {
			info.Metadata = violationMetadata(accountID, stateErr.Violations[0])
		}
		return withDetails(codes.FailedPrecondition, stateErr.Message, info)
	case errors.As(err, &invalidErr):
		return invalidArgument(&errdetails.BadRequest_FieldViolation{Field: invalidErr.Field, Description: invalidErr.Description})
	case errors.As(err, &keyErr):
		return withDetails(codes.InvalidArgument, keyErr.Error()+"; use a new key for a new request",
			&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{
				Field: "idempotency_key", Description: keyErr.Error(),
			}}},
			&errdetails.ErrorInfo{Reason: ReasonKeyReused, Domain: errorDomain, Metadata: map[string]string{"idempotency_key": keyErr.Key}})
	case errors.As(err, &countedErr):
		return withDetails(codes.AlreadyExists, countedErr.Error(),
			&errdetails.ErrorInfo{Reason: ReasonResourceCounted, Domain: errorDomain, Metadata: map[string]string{
				"metric": string(countedErr.Metric), "resource_id": countedErr.ResourceID,
			}})
	case errors.Is(err, metering.ErrAccountNotFound):
		return notFound("account", accountID, "account not found; create it with SetAccountPlan")
	case errors.Is(err, metering.ErrReservationNotFound):
		return notFound("reservation", "", "reservation not found in this account")
	case errors.Is(err, metering.ErrPlanNotFound):
		return notFound("plan", "", "plan not found; create it with UpsertPlan")
	case errors.Is(err, metering.ErrTokenNotFound):
		return notFound("service token", "", "service token not found")
	case errors.Is(err, metering.ErrResourceNotFound):
		return notFound("resource", "", "no usage was counted for this resource and metric")
	case errors.Is(err, metering.ErrInvalidPageToken):
		return invalidArgument(&errdetails.BadRequest_FieldViolation{Field: "page_token", Description: "must be a next_page_token from a previous response"})
	case errors.Is(err, metering.ErrOverflow):
		return invalidArgument(&errdetails.BadRequest_FieldViolation{Field: "items", Description: "with the current usage the sum would overflow a 64-bit counter"})
	case errors.Is(err, metering.ErrUnavailable):
		a.logger.WarnContext(ctx, "database unavailable", "error", err)
		return status.Error(codes.Unavailable, "database unavailable; retry with backoff")
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "request canceled")
	}

	a.logger.ErrorContext(ctx, "request failed", "error", err)
	return status.Error(codes.Internal, "internal error")
}

// limitStatus builds RESOURCE_EXHAUSTED with QuotaFailure and ErrorInfo for
// the first violation, and RetryInfo when every violated counter is a period
// counter, since only the next period frees those.
func (a *API) limitStatus(ctx context.Context, accountID string, e *metering.LimitError) error {
	first := e.Violations[0]
	reason := ReasonPlanLimitExceeded
	if first.Scope == metering.ScopeParent {
		reason = ReasonParentLimitExceeded
	}

	quota := &errdetails.QuotaFailure{}
	periodOnly := true
	for _, v := range e.Violations {
		quota.Violations = append(quota.Violations, &errdetails.QuotaFailure_Violation{
			Subject:     subject(accountID, v),
			Description: fmt.Sprintf("used %d + reserved %d + requested %d exceeds the limit %d", v.Used, v.Reserved, v.Requested, *v.Limit),
		})
		if v.Kind != metering.PeriodCounter {
			periodOnly = false
		}
	}
	meta := violationMetadata(accountID, first)
	meta["period_end"] = e.Period.End.Format(time.RFC3339Nano)
	info := &errdetails.ErrorInfo{Reason: reason, Domain: errorDomain, Metadata: meta}

	msg := fmt.Sprintf("%s limit exceeded for metric %s", first.Scope, first.Metric)
	if first.Scope == metering.ScopeParent {
		msg += fmt.Sprintf(" in parent %q", first.ParentID)
	}
	msg += fmt.Sprintf(": used %d, reserved %d, requested %d, limit %d", first.Used, first.Reserved, first.Requested, *first.Limit)

	details := []protoadapt.MessageV1{quota, info}
	if periodOnly {
		// Whole seconds, rounded up, so a client that waits this long is past the
		// period's end.
		wait := e.Period.End.Sub(a.svc.Now())
		if wait%time.Second != 0 {
			wait = wait.Truncate(time.Second) + time.Second
		}
		wait = max(wait, time.Second)
		details = append(details, &errdetails.RetryInfo{RetryDelay: durationpb.New(wait)})
	}
	return withDetails(codes.ResourceExhausted, msg, details...)
}

// subject names the counter in a QuotaFailure: "accounts/A/metrics/M" or
// "accounts/A/metrics/M/parents/P".
func subject(accountID string, c metering.Counter) string {
	s := "accounts/" + accountID + "/metrics/" + string(c.Metric)
	if c.Scope == metering.ScopeParent {
		s += "/parents/" + c.ParentID
	}
	return s
}

func violationMetadata(accountID string, c metering.Counter) map[string]string {
	meta := map[string]string{
		"account_id": accountID,
		"metric":     string(c.Metric),
		"scope":      string(c.Scope),
		"used":       strconv.FormatInt(c.Used, 10),
		"reserved":   strconv.FormatInt(c.Reserved, 10),
		"requested":  strconv.FormatInt(c.Requested, 10),
	}
	if c.Limit != nil {
		meta["limit"] = strconv.FormatInt(*c.Limit, 10)
	}
	if c.Scope == metering.ScopeParent {
		meta["parent_id"] = c.ParentID
	}
	return meta
}

func notFound(resourceType, name, msg string) error {
	return withDetails(codes.NotFound, msg, &errdetails.ResourceInfo{ResourceType: resourceType, ResourceName: name})
}

func withDetails(code codes.Code, msg string, details ...protoadapt.MessageV1) error {
	st, err := status.New(code, msg).WithDetails(details...)
	if err != nil {
		return status.Error(code, msg)
	}
	return st.Err()
}
