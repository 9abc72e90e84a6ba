package auth

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/golang-jwt/jwt/v5"
)

// Registered claim names read by this package (RFC 7519 section 4.1).
const (
	claimSubject   = "sub"
	claimIssuer    = "iss"
	claimAudience  = "aud"
	claimExpiresAt = "exp"
	claimNotBefore = "nbf"
	claimIssuedAt  = "iat"
)

// knownClaims are the claim names that this package reads.
var knownClaims = []string{
	claimSubject, claimIssuer, claimAudience, claimExpiresAt, claimNotBefore, claimIssuedAt,
	ClaimAccountID, ClaimRole, ClaimPlatformAdmin,
}

// maxNumericDate is the largest exp, nbf or iat accepted, in seconds since
// 1970: 9999-12-31T23:59:59Z. A larger number would overflow the int64
// conversion of jwt.NumericDate.
const maxNumericDate = 253402300799

// invalidJWTError rejects a JWT for a reason that this package checks
// itself. Its message goes to the client, so it names claims and headers
// but never contains a value taken from the token.
type invalidJWTError struct {
	message string
}

func (e *invalidJWTError) Error() string {
	return e.message
}

func rejectJWT(format string, args ...any) error {
	return &invalidJWTError{message: fmt.Sprintf(format, args...)}
}

// jwtClaims are the claims read from a JWT. MintDevJWT and the tests
// marshal it with its json tags. Decoding goes through UnmarshalJSON,
// because encoding/json matches field tags case-insensitively and would
// read "PLATFORM_ADMIN" as platform_admin.
type jwtClaims struct {
	jwt.RegisteredClaims
	AccountID     string `json:"account_id,omitempty"`
	Role          string `json:"role,omitempty"`
	PlatformAdmin bool   `json:"platform_admin,omitempty"`
}

// UnmarshalJSON decodes a JWT claims set, matching claim names exactly
// (RFC 7519 section 4 makes them case-sensitive). It rejects a claims set
// that is not a JSON object, that repeats a name, or that has a name
// differing from a known claim only in letter case. Each known claim must
// have its JSON type: sub, iss, account_id and role are strings, aud is a
// string or an array of strings, exp, nbf and iat are numbers from 0 to
// maxNumericDate, and platform_admin is a boolean. A known claim whose value
// is null counts as absent. Other claims are ignored. Errors are
// *invalidJWTError.
func (c *jwtClaims) UnmarshalJSON(data []byte) error {
	members, err := claimMembers(data)
	if err != nil {
		return err
	}

	var claims jwtClaims
	stringClaims := []struct {
		name string
		dst  *string
	}{
		{claimSubject, &claims.Subject},
		{claimIssuer, &claims.Issuer},
		{ClaimAccountID, &claims.AccountID},
		{ClaimRole, &claims.Role},
	}
	for _, s := range stringClaims {
		if err := decodeClaim(members, s.name, "string", s.dst); err != nil {
			return err
		}
	}

	dateClaims := []struct {
		name string
		dst  **jwt.NumericDate
	}{
		{claimExpiresAt, &claims.ExpiresAt},
		{claimNotBefore, &claims.NotBefore},
		{claimIssuedAt, &claims.IssuedAt},
	}
	for _, d := range dateClaims {
		date, err := numericDateClaim(members, d.name)
		if err != nil {
			return err
		}
		*d.dst = date
	}

	if claims.Audience, err = audienceClaim(members); err != nil {
		return err
	}
	if err := decodeClaim(members, ClaimPlatformAdmin, "boolean", &claims.PlatformAdmin); err != nil {
		return err
	}

	*c = claims

	return nil
}

// claimMembers returns the members of the JSON object data by exact name.
// It rejects data that is not an object, a repeated name and a name that
// differs from a known claim only in letter case.
func claimMembers(data []byte) (map[string]json.RawMessage, error) {
	decoder := json.NewDecoder(bytes.NewReader(data))
	start, err := decoder.Token()
	if err != nil || start != json.Delim('{') {
		return nil, rejectJWT("JWT claims are not a JSON object")
	}

	members := make(map[string]json.RawMessage)
	for decoder.More() {
		nameToken, err := decoder.Token()
		if err != nil {
			return nil, rejectJWT("JWT claims are not valid JSON")
		}
		// The decoder returns object keys as strings, unescaped.
		name, _ := nameToken.(string)

		var value json.RawMessage
		if err := decoder.Decode(&value); err != nil {
			return nil, rejectJWT("JWT claims are not valid JSON")
		}
		if err := checkClaimName(name, members); err != nil {
			return nil, err
		}
		members[name] = value
	}

	return members, nil
}

// checkClaimName rejects name when members already has it, or when it
// differs from a known claim only in letter case. Messages name only known
// claims, never a name from the token.
func checkClaimName(name string, members map[string]json.RawMessage) error {
	for _, known := range knownClaims {
		if name != known && strings.EqualFold(name, known) {
			return rejectJWT("JWT has a claim whose name differs from %q only in letter case; claim names are case-sensitive", known)
		}
	}

	if _, repeated := members[name]; !repeated {
		return nil
	}
	for _, known := range knownClaims {
		if name == known {
			return rejectJWT("JWT has the claim %s twice", known)
		}
	}

	return rejectJWT("JWT has a claim name twice")
}

// jsonType returns the JSON type of raw, a valid JSON value, by its first
// byte: "string", "number", "boolean", "null", "array" or "object".
func jsonType(raw json.RawMessage) string {
	raw = bytes.TrimLeft(raw, " \t\r\n")
	if len(raw) == 0 {
		return ""
	}

	switch raw[0] {
	case '"':
		return "string"
	case 't', 'f':
		return "boolean"
	case 'n':
		return "null"
	case '[':
		return "array"
	case '{':
		return "object"
	default:
		return "number"
	}
}

// decodeClaim decodes the claim name into dst when it is present, not null
// and of JSON type want.
func decodeClaim(members map[string]json.RawMessage, name, want string, dst any) error {
	raw, ok := members[name]
	if !ok || jsonType(raw) == "null" {
		return nil
	}
	if jsonType(raw) != want {
		return rejectJWT("JWT claim %s has the wrong type: it must be a JSON %s", name, want)
	}
	if err := json.Unmarshal(raw, dst); err != nil {
		return rejectJWT("JWT claim %s has the wrong type: it must be a JSON %s", name, want)
	}

	return nil
}

// numericDateClaim returns the NumericDate claim name, or nil when it is
// absent or null. The value must be a JSON number: encoding/json would also
// accept a string holding a number.
func numericDateClaim(members map[string]json.RawMessage, name string) (*jwt.NumericDate, error) {
	raw, ok := members[name]
	if !ok || jsonType(raw) == "null" {
		return nil, nil
	}
	if jsonType(raw) != "number" {
		return nil, rejectJWT("JWT claim %s has the wrong type: it must be a JSON number", name)
	}

	// Unmarshal fails for a number beyond the float64 range, such as 1e400.
	var seconds float64
	if err := json.Unmarshal(raw, &seconds); err != nil || seconds < 0 || seconds > maxNumericDate {
		return nil, rejectJWT("JWT claim %s is out of range: it must be seconds since 1970, from 0 to %d", name, maxNumericDate)
	}

	var date jwt.NumericDate
	if err := date.UnmarshalJSON(raw); err != nil {
		return nil, rejectJWT("JWT claim %s has the wrong type: it must be a JSON number", name)
	}

	return &date, nil
}

// audienceClaim returns the aud claim, a string or an array of strings, or
// nil when it is absent or null.
func audienceClaim(members map[string]json.RawMessage) (jwt.ClaimStrings, error) {
	raw, ok := members[claimAudience]
	if !ok || jsonType(raw) == "null" {
		return nil, nil
	}

	wrongType := rejectJWT("JWT claim %s has the wrong type: it must be a JSON string or an array of strings", claimAudience)
	switch jsonType(raw) {
	case "string":
		var audience string
		if err := json.Unmarshal(raw, &audience); err != nil {
			return nil, wrongType
		}

		return jwt.ClaimStrings{audience}, nil
	case "array":
		var elements []json.RawMessage
		if err := json.Unmarshal(raw, &elements); err != nil {
			return nil, wrongType
		}
		audience := make(jwt.ClaimStrings, 0, len(elements))
		for _, element := range elements {
			var value string
			if jsonType(element) != "string" || json.Unmarshal(element, &value) != nil {
				return nil, wrongType
			}
			audience = append(audience, value)
		}

		return audience, nil
	default:
		return nil, wrongType
	}
}
