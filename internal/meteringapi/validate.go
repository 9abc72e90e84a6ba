package meteringapi

import (
	"fmt"
	"regexp"
	"strings"
	"unicode/utf8"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	meteringv1 "github.com/metering/metering/gen/metering/v1"
	"github.com/metering/metering/internal/auth"
	"github.com/metering/metering/internal/metering"
)

// Input limits.
const (
	// MaxIDLength is the longest account, parent, resource or reservation id
	// and idempotency key, in bytes.
	MaxIDLength = 128
	// MaxReasonLength is the longest AdjustUsage reason, in bytes.
	MaxReasonLength = 1024
	// MaxDisplayNameLength is the longest plan display name, in bytes.
	MaxDisplayNameLength = 200
	// DefaultPageSize and MaxPageSize bound ListReservations pages.
	DefaultPageSize = 100
	MaxPageSize     = 1000
)

var (
	planIDPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)
	uuidPattern   = regexp.MustCompile(`^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$`)
)

// violations collects the invalid fields of one request.
type violations struct {
	list []*errdetails.BadRequest_FieldViolation
}

func (v *violations) add(field, format string, args ...any) {
	v.list = append(v.list, &errdetails.BadRequest_FieldViolation{Field: field, Description: fmt.Sprintf(format, args...)})
}

// err returns INVALID_ARGUMENT with a BadRequest detail, or nil when no
// field is invalid.
func (v *violations) err() error {
	if len(v.list) == 0 {
		return nil
	}
	return invalidArgument(v.list...)
}

func invalidArgument(list ...*errdetails.BadRequest_FieldViolation) error {
	msg := "invalid " + list[0].GetField() + ": " + list[0].GetDescription()
	if len(list) > 1 {
		msg += fmt.Sprintf(" (and %d more invalid fields)", len(list)-1)
	}
	st, err := status.New(codes.InvalidArgument, msg).WithDetails(&errdetails.BadRequest{FieldViolations: list})
	if err != nil {
		return status.Error(codes.InvalidArgument, msg)
	}
	return st.Err()
}

// text checks a string field: valid UTF-8, at most maxLen bytes, and present
// when required.
func (v *violations) text(field, value string, required bool, maxLen int) {
	switch {
	case !utf8.ValidString(value):
		v.add(field, "must be valid UTF-8")
	case strings.ContainsRune(value, 0):
		v.add(field, "must not contain NUL (U+0000) characters")
	case required && value == "":
		v.add(field, "is required")
	case len(value) > maxLen:
		v.add(field, "must be at most %d bytes, got %d", maxLen, len(value))
	}
}

func (v *violations) id(field, value string) {
	v.text(field, value, true, MaxIDLength)
}

func (v *violations) optionalID(field, value string) {
	v.text(field, value, false, MaxIDLength)
}

func (v *violations) uuid(field, value string) {
	if value == "" {
		v.add(field, "is required")
		return
	}
	if !uuidPattern.MatchString(value) {
		v.add(field, "must be a UUID such as 0b6f6c7e-3c1a-4f5e-9d1e-2a8f4e6b7c90")
	}
}

// metric checks a metric enum and returns its catalog entry.
func (v *violations) metric(field string, m meteringv1.Metric) (metering.MetricInfo, bool) {
	name, ok := metricNames[m]
	if !ok {
		v.add(field, "must be one of METRIC_AGENTS, METRIC_TASKS, METRIC_DOCUMENTS, METRIC_MESSAGES, METRIC_STORAGE_BYTES, got %s", m)
		return metering.MetricInfo{}, false
	}
	return metering.Info(name)
}

// parent checks an item's parent_id against its metric.
func (v *violations) parent(field, parentID string, info metering.MetricInfo, known bool) {
	v.optionalID(field, parentID)
	if known && parentID != "" && info.ParentKind == "" {
		v.add(field, "must be empty: metric %s has no per-parent limit", info.Metric)
	}
}

// usageItems checks the items of CheckAndReserve and RecordUsage: one to
// len(Catalog) items, each metric at most once, amounts above zero.
func (v *violations) usageItems(list []*meteringv1.UsageItem) {
	if len(list) == 0 {
		v.add("items", "must contain at least one item")
		return
	}
	seen := make(map[meteringv1.Metric]int)
	for i, item := range list {
		field := usageItemFields(i)
		info, known := v.metric(field.metric, item.GetMetric())
		if known {
			if first, dup := seen[item.GetMetric()]; dup {
				v.add(field.metric, "must not repeat %s, already in items[%d]", item.GetMetric(), first)
			}
			seen[item.GetMetric()] = i
		}
		if item.GetAmount() <= 0 {
			v.add(field.amount, "must be above zero, got %d", item.GetAmount())
		}
		v.parent(field.parentID, item.GetParentId(), info, known)
	}
}

// itemFields contains the field names of one element of items.
type itemFields struct {
	metric, amount, parentID string
}

// commonItemFields contains the field names of the first elements of items,
// built once, so that checking a valid request builds no strings. A valid
// request has at most one item per metric.
var commonItemFields = func() []itemFields {
	fields := make([]itemFields, len(metricNames))
	for i := range fields {
		fields[i] = newItemFields(i)
	}
	return fields
}()

func usageItemFields(i int) itemFields {
	if i < len(commonItemFields) {
		return commonItemFields[i]
	}
	return newItemFields(i)
}

func newItemFields(i int) itemFields {
	prefix := fmt.Sprintf("items[%d]", i)
	return itemFields{metric: prefix + ".metric", amount: prefix + ".amount", parentID: prefix + ".parent_id"}
}

// ttl checks a reservation TTL: unset or zero takes the default.
func (v *violations) ttl(d *durationpb.Duration) {
	if d == nil {
		return
	}
	if err := d.CheckValid(); err != nil {
		v.add("ttl", "must be a valid duration: %v", err)
		return
	}
	switch ttl := d.AsDuration(); {
	case ttl < 0:
		v.add("ttl", "must not be negative, got %s", ttl)
	case ttl > 0 && ttl < metering.MinTTL:
		v.add("ttl", "must be zero (the default, %s) or at least %s, got %s", metering.DefaultTTL, metering.MinTTL, ttl)
	case ttl > metering.MaxTTL:
		v.add("ttl", "must be at most %s, got %s", metering.MaxTTL, ttl)
	}
}

// scopes checks the scopes of a new service token: at least one, each known
// and listed once. The admin scope needs a token for all accounts, because
// admin methods are not scoped to one account.
func (v *violations) scopes(list []string, bound bool) {
	if len(list) == 0 {
		v.add("scopes", "must contain at least one of %s, %s, %s", auth.ScopeUsageRead, auth.ScopeUsageWrite, auth.ScopeAdmin)
		return
	}
	seen := make(map[string]bool)
	for i, scope := range list {
		field := fmt.Sprintf("scopes[%d]", i)
		switch {
		case scope != auth.ScopeUsageRead && scope != auth.ScopeUsageWrite && scope != auth.ScopeAdmin:
			v.add(field, "must be one of %s, %s, %s", auth.ScopeUsageRead, auth.ScopeUsageWrite, auth.ScopeAdmin)
		case seen[scope]:
			v.add(field, "must not repeat %s", scope)
		case scope == auth.ScopeAdmin && bound:
			v.add(field, "admin requires a token for all accounts: leave account_id empty")
		}
		seen[scope] = true
	}
}
