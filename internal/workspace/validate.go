package workspace

import (
	"fmt"
	"strings"
	"unicode/utf8"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
)

// Input limits, in bytes.
const (
	// MaxIDLength is the longest account id, resource id, request id and
	// upload idempotency key, as in Metering.
	MaxIDLength = 128
	// MaxNameLength is the longest agent name, task title, document name,
	// document key and file name.
	MaxNameLength = 256
	// MaxContentLength is the longest document content: 1 MiB.
	MaxContentLength = 1 << 20
	// MaxBodyLength is the longest message body: 64 KiB.
	MaxBodyLength = 64 << 10
)

// violations collects the invalid fields of one request.
type violations struct {
	list []*errdetails.BadRequest_FieldViolation
}

func (v *violations) add(field, format string, args ...any) {
	v.list = append(v.list, &errdetails.BadRequest_FieldViolation{Field: field, Description: fmt.Sprintf(format, args...)})
}

// err returns an invalidError with every violation, or nil.
func (v *violations) err() error {
	if len(v.list) == 0 {
		return nil
	}

	return &invalidError{violations: v.list}
}

// text checks a string field: valid UTF-8 without NUL, which PostgreSQL text
// cannot store, at most maxLen bytes, and present when required.
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

func (v *violations) name(field, value string) {
	v.text(field, value, true, MaxNameLength)
}
