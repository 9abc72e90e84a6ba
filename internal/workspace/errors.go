package workspace

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/protoadapt"
)

// errorDomain is the google.rpc.ErrorInfo domain of the workspace's own
// errors. Errors passed through from Metering keep Metering's domain.
const errorDomain = "workspace"

// ErrorInfo reasons of the workspace's own errors, and the Metering reasons
// it acts on.
const (
	// ReasonRequestResourceDeleted: a retry names a request id whose create
	// succeeded, but the created resource has been deleted since.
	ReasonRequestResourceDeleted = "REQUEST_RESOURCE_DELETED"
	// ReasonTooManyAttempts: a request id failed so often that it has no
	// idempotency key left in Metering.
	ReasonTooManyAttempts = "TOO_MANY_ATTEMPTS"
	// ReasonDocumentInOtherTask: UpsertDocument named a task_id, but the
	// document with the key belongs to another task, or to none.
	ReasonDocumentInOtherTask = "DOCUMENT_IN_OTHER_TASK"

	meteringReasonReservationExpired = "RESERVATION_EXPIRED"
	meteringReasonKeyReused          = "IDEMPOTENCY_KEY_REUSED"
)

// outageLogInterval is the shortest time between two log records of an
// unreachable database or Metering, so that an outage does not flood the
// log.
const outageLogInterval = 10 * time.Second

// Status messages that carry no detail, because the detail is logged.
const (
	internalErrorMessage       = "internal error"
	databaseUnavailableMessage = "the workspace database is unavailable, so nothing was changed; retry with backoff"
	meteringUnavailableMessage = "Metering is unavailable, so nothing was changed; retry with backoff"
	meteringPendingMessage     = "Metering is unavailable, so the create could not be confirmed: it is completed " +
		"or undone in the background, and a retry with the same request id returns the result"
	databasePendingMessage = "the workspace database is unavailable, so the create could not be confirmed: it is " +
		"completed in the background, and a retry with the same request id returns the result"
	deletePendingMessage = "the workspace database is unavailable, so the delete could not be confirmed: it is " +
		"completed in the background"
)

// invalidError is a request with invalid fields.
type invalidError struct {
	violations []*errdetails.BadRequest_FieldViolation
}

func (e *invalidError) Error() string {
	v := e.violations[0]
	msg := "invalid " + v.GetField() + ": " + v.GetDescription()
	if len(e.violations) > 1 {
		msg += fmt.Sprintf(" (and %d more invalid fields)", len(e.violations)-1)
	}

	return msg
}

// invalidField returns an invalidError for one field.
func invalidField(field, format string, args ...any) error {
	return &invalidError{violations: []*errdetails.BadRequest_FieldViolation{{
		Field: field, Description: fmt.Sprintf(format, args...),
	}}}
}

// notFoundError is a resource that does not exist in the caller's account.
type notFoundError struct {
	kind string // "agent", "task", "document", "message" or "attachment"
	id   string
}

func (e *notFoundError) Error() string {
	return fmt.Sprintf("%s %q not found", e.kind, e.id)
}

// requestReusedError is a request id, or an upload idempotency key, that an
// earlier request with other content used.
type requestReusedError struct {
	field string // request_id or header.idempotency_key
	id    string
}

func (e *requestReusedError) Error() string {
	return fmt.Sprintf("%s %q was used for another request", e.field, e.id)
}

// resourceGoneError is the retry of a create whose resource was deleted
// after the create succeeded.
type resourceGoneError struct {
	field string
	id    string
	kind  string
	resID string
}

func (e *resourceGoneError) Error() string {
	return fmt.Sprintf("%s %q created %s %q, which has been deleted since", e.field, e.id, e.kind, e.resID)
}

// errTooManyAttempts is a request id whose attempts used every idempotency
// key that Metering may see for it.
var errTooManyAttempts = errors.New("the request failed too many times with this request id")

// errConcurrentAttempt is a reservation that another attempt of the same
// request released or committed for another resource meanwhile.
var errConcurrentAttempt = errors.New("a concurrent attempt of this request changed its reservation")

// errAlreadyCommitted is a reservation that Metering committed already:
// another attempt of the same request committed it with other amounts, or a
// release came after the commit.
var errAlreadyCommitted = errors.New("the reservation was committed already")

// errDatabaseUnavailable wraps errors that mean PostgreSQL could not serve
// the request.
var errDatabaseUnavailable = errors.New("database unavailable")

// errMeteringTimedOut ends the time budget of the Metering calls that a
// create or delete makes while its transaction is open.
var errMeteringTimedOut = errors.New("metering did not respond within the time budget")

// pendingError is a create or delete whose outcome is not known when the
// request ends, because Metering or the database did not respond in time. A
// background task completes it, or undoes it, later.
type pendingError struct {
	cause error
	// deletion is set for a delete.
	deletion bool
}

func (e *pendingError) Error() string {
	if e.deletion {
		return "delete settled in the background: " + e.cause.Error()
	}

	return "create settled in the background: " + e.cause.Error()
}

func (e *pendingError) Unwrap() error { return e.cause }

// uploadTimeoutError is an upload aborted because no chunk arrived within
// the idle timeout, or because it outlasted its reservation.
type uploadTimeoutError struct {
	idle  bool
	limit time.Duration
}

func (e *uploadTimeoutError) Error() string {
	if e.idle {
		return fmt.Sprintf("no chunk arrived for %s, so the upload was aborted", e.limit)
	}

	return fmt.Sprintf("the upload took longer than its reservation of %s, so it was aborted", e.limit)
}

// documentTaskError is an UpsertDocument whose task_id differs from the task
// of the existing document with the key.
type documentTaskError struct {
	key            string
	taskID         string
	documentTaskID string // empty for a document outside any task
}

func (e *documentTaskError) Error() string {
	owner := "no task"
	if e.documentTaskID != "" {
		owner = fmt.Sprintf("task %q", e.documentTaskID)
	}

	return fmt.Sprintf("the document with key %q belongs to %s, not to task %q", e.key, owner, e.taskID)
}

// uploadTooLargeError is an upload that sent more bytes than its header
// declared.
type uploadTooLargeError struct {
	declared int64
}

func (e *uploadTooLargeError) Error() string {
	return fmt.Sprintf("the upload sent more than the %d bytes that its header declared", e.declared)
}

// meteringError is a failed call to Metering, with Metering's status.
type meteringError struct {
	method string // the Metering method, such as "CheckAndReserve"
	// keyField names the request field the idempotency key derives from,
	// for the error of a reused key.
	keyField string
	keyValue string
	status   *status.Status
}

func (e *meteringError) Error() string {
	return fmt.Sprintf("metering %s: %s: %s", e.method, e.status.Code(), e.status.Message())
}

// toStatus maps an error of this package to a gRPC status. It is the only
// place that chooses status codes. Errors it does not know are logged and
// become INTERNAL with a generic message.
func (s *Service) toStatus(ctx context.Context, err error) error {
	var (
		invalid   *invalidError
		notFound  *notFoundError
		reused    *requestReusedError
		deleted   *resourceGoneError
		tooLarge  *uploadTooLargeError
		timedOut  *uploadTimeoutError
		wrongTask *documentTaskError
		pending   *pendingError
		meterErr  *meteringError
		statusErr interface{ GRPCStatus() *status.Status }
	)

	switch {
	case err == nil:
		return nil
	case errors.As(err, &invalid):
		return withDetails(codes.InvalidArgument, invalid.Error(), &errdetails.BadRequest{FieldViolations: invalid.violations})
	case errors.As(err, &notFound):
		return withDetails(codes.NotFound, notFound.Error()+" in this account",
			&errdetails.ResourceInfo{ResourceType: notFound.kind, ResourceName: notFound.id, Description: "not found in this account"})
	case errors.As(err, &reused):
		return withDetails(codes.InvalidArgument, reused.Error()+"; use a new one for a new request",
			&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{
				Field: reused.field, Description: "was used for another request; use a new one for a new request",
			}}})
	case errors.As(err, &deleted):
		return withDetails(codes.FailedPrecondition, deleted.Error()+"; use a new one to create another",
			&errdetails.ErrorInfo{Reason: ReasonRequestResourceDeleted, Domain: errorDomain, Metadata: map[string]string{
				deleted.field: deleted.id, "resource_type": deleted.kind, "resource_id": deleted.resID,
			}})
	case errors.As(err, &tooLarge):
		return withDetails(codes.InvalidArgument, tooLarge.Error()+"; nothing was stored",
			&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{{
				Field: "chunk", Description: fmt.Sprintf("the chunks must add up to at most header.size, %d bytes", tooLarge.declared),
			}}})
	case errors.As(err, &timedOut):
		return status.Error(codes.DeadlineExceeded, timedOut.Error()+" and nothing was stored; send the chunks without long pauses")
	case errors.As(err, &wrongTask):
		return withDetails(codes.FailedPrecondition, wrongTask.Error()+"; leave task_id empty or name the document's task",
			&errdetails.ErrorInfo{Reason: ReasonDocumentInOtherTask, Domain: errorDomain, Metadata: map[string]string{
				"key": wrongTask.key, "task_id": wrongTask.taskID, "document_task_id": wrongTask.documentTaskID,
			}})
	case errors.As(err, &pending):
		s.logOutage(ctx, "outcome settled in the background; repeats within the log interval are not logged", err)
		switch {
		case pending.deletion:
			return status.Error(codes.Unavailable, deletePendingMessage)
		case errors.Is(err, errDatabaseUnavailable):
			return status.Error(codes.Unavailable, databasePendingMessage)
		}
		return status.Error(codes.Unavailable, meteringPendingMessage)
	case errors.Is(err, errTooManyAttempts):
		return withDetails(codes.FailedPrecondition, err.Error()+"; use a new request id",
			&errdetails.ErrorInfo{Reason: ReasonTooManyAttempts, Domain: errorDomain})
	case errors.Is(err, errConcurrentAttempt), errors.Is(err, errAlreadyCommitted):
		return status.Error(codes.Aborted, err.Error()+"; retry the request")
	case errors.As(err, &meterErr):
		return s.meteringStatus(ctx, meterErr)
	case errors.Is(err, errMeteringTimedOut):
		s.logOutage(ctx, "metering unavailable; repeats within the log interval are not logged", err)
		return status.Error(codes.Unavailable, meteringUnavailableMessage)
	case errors.Is(err, errDatabaseUnavailable):
		s.logOutage(ctx, "database unavailable; repeats within the log interval are not logged", err)
		return status.Error(codes.Unavailable, databaseUnavailableMessage)
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "request canceled")
	case errors.As(err, &statusErr):
		// Errors of receiving on a stream already carry their status: a
		// client that went away, or the account check of the auth
		// interceptor. Metering's errors never get here: they are
		// meteringErrors.
		if st := statusErr.GRPCStatus(); st.Code() != codes.Unknown {
			return st.Err()
		}
	}

	s.logger.ErrorContext(ctx, "request failed", "error", err)

	return status.Error(codes.Internal, internalErrorMessage)
}

// logOutage logs err at most once per outageLogInterval.
func (s *Service) logOutage(ctx context.Context, msg string, err error) {
	s.outageLog.Do(func() {
		s.logger.WarnContext(ctx, msg, "error", err, "log_interval", outageLogInterval)
	})
}

// meteringStatus maps a failed Metering call. Quota rejections pass through
// with Metering's details, so the caller sees the limit and the usage.
func (s *Service) meteringStatus(ctx context.Context, e *meteringError) error {
	st := e.status
	reason := errorReason(st)

	switch st.Code() {
	case codes.ResourceExhausted:
		return st.Err()
	case codes.Unavailable, codes.DeadlineExceeded:
		s.outageLog.Do(func() {
			s.logger.WarnContext(ctx, "metering unavailable; repeats within the log interval are not logged",
				"method", e.method, "code", st.Code().String(), "error", st.Message(), "log_interval", outageLogInterval)
		})
		return status.Error(codes.Unavailable, meteringUnavailableMessage)
	case codes.Canceled:
		return status.Error(codes.Canceled, "request canceled")
	case codes.FailedPrecondition:
		if reason == meteringReasonReservationExpired {
			// The reservation expired before the write finished and its
			// capacity was taken meanwhile, so the create was undone.
			return withStatusDetails(codes.ResourceExhausted,
				"the reservation expired before the create finished and the capacity is no longer free, so nothing was created: "+st.Message(), st)
		}
	case codes.InvalidArgument:
		if reason == meteringReasonKeyReused {
			return s.toStatus(ctx, &requestReusedError{field: e.keyField, id: e.keyValue})
		}
	case codes.NotFound:
		if resourceType(st) == "account" {
			return status.Error(codes.FailedPrecondition,
				"the account has no plan in Metering, so nothing can be counted for it; an operator must assign one with SetAccountPlan")
		}
	}

	s.logger.ErrorContext(ctx, "metering call failed", "method", e.method, "code", st.Code().String(), "error", st.Message())
	if st.Code() == codes.Unauthenticated || st.Code() == codes.PermissionDenied {
		// The workspace's own token is wrong: a configuration error that
		// retrying later may fix once an operator issues a new token.
		return status.Error(codes.Unavailable, "Metering rejected the workspace server's credentials, so nothing was changed; retry later")
	}

	return status.Error(codes.Internal, internalErrorMessage)
}

// errorReason returns the reason of the first ErrorInfo detail of st, or "".
func errorReason(st *status.Status) string {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok {
			return info.GetReason()
		}
	}

	return ""
}

// resourceType returns the resource type of the first ResourceInfo detail of
// st, or "".
func resourceType(st *status.Status) string {
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ResourceInfo); ok {
			return info.GetResourceType()
		}
	}

	return ""
}

// withDetails returns a status error with code, msg and details. A detail
// that cannot be marshalled is dropped, keeping the code and message.
func withDetails(code codes.Code, msg string, details ...protoadapt.MessageV1) error {
	st, err := status.New(code, msg).WithDetails(details...)
	if err != nil {
		return status.Error(code, msg)
	}

	return st.Err()
}

// withStatusDetails returns a status error with code, msg and the details
// of from.
func withStatusDetails(code codes.Code, msg string, from *status.Status) error {
	// Proto returns a copy, so from is left unchanged.
	p := from.Proto()
	p.Code = int32(code)
	p.Message = msg

	return status.FromProto(p).Err()
}
