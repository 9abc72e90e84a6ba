package workspace

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/protobuf/types/known/timestamppb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	workspacev1 "github.com/metering/metering/gen/workspace/v1"
)

// taskServer serves TaskService.
type taskServer struct {
	workspacev1.UnimplementedTaskServiceServer
	svc *Service
}

// CreateTask counts one task in the current billing period and creates it.
func (t *taskServer) CreateTask(ctx context.Context, req *workspacev1.CreateTaskRequest) (*workspacev1.CreateTaskResponse, error) {
	var v violations
	v.id("account_id", req.GetAccountId())
	v.name("title", req.GetTitle())
	v.optionalID("request_id", req.GetRequestId())
	if err := v.err(); err != nil {
		return nil, t.svc.toStatus(ctx, err)
	}

	task, err := t.svc.createTask(ctx, req)
	if err != nil {
		return nil, t.svc.toStatus(ctx, err)
	}

	return &workspacev1.CreateTaskResponse{Task: task.proto()}, nil
}

// task is a row of workspace.tasks.
type task struct {
	ID         string
	AccountID  string
	Title      string
	CreatedBy  string
	CreateTime time.Time
}

func (t task) proto() *workspacev1.Task {
	return &workspacev1.Task{
		Id:         t.ID,
		AccountId:  t.AccountID,
		Title:      t.Title,
		CreatedBy:  t.CreatedBy,
		CreateTime: timestamppb.New(t.CreateTime),
	}
}

func (s *Service) createTask(ctx context.Context, req *workspacev1.CreateTaskRequest) (task, error) {
	const operation = "CreateTask"
	const query = `
		INSERT INTO workspace.tasks (id, account_id, title, created_by, create_time)
		VALUES ($1, $2, $3, $4, $5)`

	hash, err := requestHash(operation, req)
	if err != nil {
		return task{}, err
	}

	t := task{
		ID:         resourceID(taskPrefix, req.GetAccountId(), req.GetRequestId()),
		AccountID:  req.GetAccountId(),
		Title:      req.GetTitle(),
		CreatedBy:  actor(ctx),
		CreateTime: s.now(),
	}
	id, replayed, err := s.guard(ctx, create{
		accountID:    t.AccountID,
		operation:    operation,
		requestID:    req.GetRequestId(),
		requestHash:  hash,
		requestField: "request_id",
		resourceID:   t.ID,
		reserved:     []*meteringv1.UsageItem{{Metric: meteringv1.Metric_METRIC_TASKS, Amount: 1}},
		ttl:          s.cfg.ReservationTTL,
		write: func(ctx context.Context, tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, query, t.ID, t.AccountID, t.Title, t.CreatedBy, t.CreateTime); err != nil {
				return fmt.Errorf("insert task %q: %w", t.ID, translate(err))
			}
			return nil
		},
	})
	if err != nil {
		return task{}, err
	}
	if replayed {
		return loadReplay(ctx, s, t.AccountID, "request_id", req.GetRequestId(), id, getTask)
	}

	return t, nil
}

// getTask returns the task, or a notFoundError.
func getTask(ctx context.Context, q querier, accountID, id string) (task, error) {
	const query = `
		SELECT id, account_id, title, created_by, create_time
		FROM workspace.tasks
		WHERE account_id = $1 AND id = $2`

	var t task
	err := q.QueryRow(ctx, query, accountID, id).Scan(&t.ID, &t.AccountID, &t.Title, &t.CreatedBy, &t.CreateTime)
	if errors.Is(err, pgx.ErrNoRows) {
		return task{}, &notFoundError{kind: "task", id: id}
	}
	if err != nil {
		return task{}, fmt.Errorf("get task %q: %w", id, translate(err))
	}
	t.CreateTime = t.CreateTime.UTC()

	return t, nil
}

// checkTask returns a notFoundError unless the task exists in the account.
// An empty id names no task and passes.
func checkTask(ctx context.Context, q querier, accountID, id string) error {
	if id == "" {
		return nil
	}

	_, err := getTask(ctx, q, accountID, id)

	return err
}
