package auth

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/metering/metering/internal/principal"
)

// claimsJSON returns a JSON object made of members, each a "name":value
// text, in order. Unlike a map, it can repeat a name.
func claimsJSON(members ...string) string {
	return "{" + strings.Join(members, ",") + "}"
}

// claimMember returns the JSON text "name":value.
func claimMember(t *testing.T, name string, value any) string {
	t.Helper()

	return string(mustJSON(t, name)) + ":" + string(mustJSON(t, value))
}

// memberClaimMembers returns the members of valid member claims at testNow
// except those named in omit.
func memberClaimMembers(t *testing.T, omit ...string) []string {
	t.Helper()

	values := []struct {
		name  string
		value any
	}{
		{"sub", testUserID},
		{"iss", testIssuer},
		{"aud", testAudience},
		{"exp", testNow.Add(testTokenTTL).Unix()},
		{"iat", testNow.Unix()},
		{ClaimAccountID, ownAccount},
		{ClaimRole, RoleMember},
	}

	var members []string
	for _, v := range values {
		if !slices.Contains(omit, v.name) {
			members = append(members, claimMember(t, v.name, v.value))
		}
	}

	return members
}

// TestAuthenticateJWTClaimNamesCaseSensitive checks that a claim is read
// only under its exact name, and that a name differing from a known claim
// only in letter case rejects the JWT instead of being read or ignored.
func TestAuthenticateJWTClaimNamesCaseSensitive(t *testing.T) {
	t.Parallel()

	a := newTestAuthenticator(t, testConfig(t, nil))
	member := memberClaimMembers(t)
	operatorWithoutAccount := append(memberClaimMembers(t, ClaimAccountID, ClaimRole), claimMember(t, "PLATFORM_ADMIN", true))
	withoutIssuer := memberClaimMembers(t, "iss")

	tests := []struct {
		name    string
		payload string
		message string
	}{
		{"Platform_Admin on member", claimsJSON(append(member, claimMember(t, "Platform_Admin", true))...),
			`differs from "platform_admin" only in letter case`},
		{"PLATFORM_ADMIN on member", claimsJSON(append(member, claimMember(t, "PLATFORM_ADMIN", true))...),
			`differs from "platform_admin" only in letter case`},
		{"PLATFORM_ADMIN without account", claimsJSON(operatorWithoutAccount...),
			`differs from "platform_admin" only in letter case`},
		{"ISS after wrong iss", claimsJSON(append([]string{claimMember(t, "iss", "https://evil.test"), claimMember(t, "ISS", testIssuer)}, withoutIssuer...)...),
			`differs from "iss" only in letter case`},
		{"ISS alone", claimsJSON(append([]string{claimMember(t, "ISS", testIssuer)}, withoutIssuer...)...),
			`differs from "iss" only in letter case`},
		{"Account_Id", claimsJSON(append(member, claimMember(t, "Account_Id", otherAccount))...),
			`differs from "account_id" only in letter case`},
		{"Exp", claimsJSON(append(member, claimMember(t, "Exp", testNow.Add(100*testTokenTTL).Unix()))...),
			`differs from "exp" only in letter case`},
		{"long s folding to sub", claimsJSON(append(member, claimMember(t, "\u017fub", testOperator))...),
			`differs from "sub" only in letter case`},
		{"iss twice", claimsJSON(append([]string{claimMember(t, "iss", "https://evil.test")}, member...)...),
			"JWT has the claim iss twice"},
		{"platform_admin twice", claimsJSON(append(member, claimMember(t, ClaimPlatformAdmin, false), claimMember(t, ClaimPlatformAdmin, true))...),
			"JWT has the claim platform_admin twice"},
		{"unknown claim twice", claimsJSON(append(member, claimMember(t, "groups", "a"), claimMember(t, "groups", "b"))...),
			"JWT has a claim name twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			token := signRaw(t, `{"alg":"HS256","typ":"JWT"}`, tt.payload)
			ctx, err := a.Authenticate(bearer(token))

			assert.Nil(t, ctx, "no context with a principal may be returned")
			assert.Equal(t, codes.Unauthenticated, status.Code(err))
			assert.Contains(t, status.Convert(err).Message(), tt.message)
			assert.NotContains(t, status.Convert(err).Message(), "evil")
		})
	}
}

// TestAuthenticateJWTClaimTypes checks that each known claim must have its
// JSON type, even where encoding/json would convert the value.
func TestAuthenticateJWTClaimTypes(t *testing.T) {
	t.Parallel()

	a := newTestAuthenticator(t, testConfig(t, nil))
	future := testNow.Add(testTokenTTL).Unix()

	tests := []struct {
		name    string
		claim   string
		value   any
		message string
	}{
		{"exp string", "exp", fmt.Sprint(future), "claim exp has the wrong type: it must be a JSON number"},
		{"exp boolean", "exp", true, "claim exp has the wrong type: it must be a JSON number"},
		{"nbf string", "nbf", fmt.Sprint(testNow.Unix()), "claim nbf has the wrong type: it must be a JSON number"},
		{"iat string", "iat", fmt.Sprint(testNow.Unix()), "claim iat has the wrong type: it must be a JSON number"},
		{"exp too large", "exp", 1e300, "claim exp is out of range"},
		{"nbf negative", "nbf", -1, "claim nbf is out of range"},
		{"platform_admin string", ClaimPlatformAdmin, "true", "claim platform_admin has the wrong type: it must be a JSON boolean"},
		{"platform_admin number", ClaimPlatformAdmin, 1, "claim platform_admin has the wrong type: it must be a JSON boolean"},
		{"sub number", "sub", 7, "claim sub has the wrong type: it must be a JSON string"},
		{"iss array", "iss", []string{testIssuer}, "claim iss has the wrong type: it must be a JSON string"},
		{"account_id number", ClaimAccountID, 7, "claim account_id has the wrong type: it must be a JSON string"},
		{"role array", ClaimRole, []string{RoleMember}, "claim role has the wrong type: it must be a JSON string"},
		{"aud number", "aud", 7, "claim aud has the wrong type: it must be a JSON string or an array of strings"},
		{"aud array of numbers", "aud", []any{testAudience, 7}, "claim aud has the wrong type: it must be a JSON string or an array of strings"},
		{"aud object", "aud", map[string]string{"a": testAudience}, "claim aud has the wrong type: it must be a JSON string or an array of strings"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			members := append(memberClaimMembers(t, tt.claim), claimMember(t, tt.claim, tt.value))
			_, err := a.Authenticate(bearer(signRaw(t, `{"alg":"HS256","typ":"JWT"}`, claimsJSON(members...))))

			assert.Equal(t, codes.Unauthenticated, status.Code(err))
			assert.Contains(t, status.Convert(err).Message(), tt.message)
		})
	}

	t.Run("claims not an object", func(t *testing.T) {
		t.Parallel()

		for _, payload := range []string{`null`, `[]`, `"sub"`, `7`} {
			_, err := a.Authenticate(bearer(signRaw(t, `{"alg":"HS256","typ":"JWT"}`, payload)))

			assert.Equal(t, codes.Unauthenticated, status.Code(err), payload)
		}
	})
}

// TestAuthenticateJWTClaimFormsAccepted checks the claim forms that stay
// accepted: null as an absent claim, fractional dates, an audience array
// and unknown claims of any type.
func TestAuthenticateJWTClaimFormsAccepted(t *testing.T) {
	t.Parallel()

	a := newTestAuthenticator(t, testConfig(t, nil))
	member := principal.Principal{Kind: principal.User, UserID: testUserID, AccountID: ownAccount, Role: RoleMember}

	tests := []struct {
		name  string
		extra []string
		omit  []string
		want  principal.Principal
	}{
		{"nbf null", []string{`"nbf":null`}, nil, member},
		{"platform_admin null", []string{`"platform_admin":null`}, nil, member},
		{"platform_admin false", []string{`"platform_admin":false`}, nil, member},
		{"fractional exp", []string{fmt.Sprintf(`"exp":%d.5`, testNow.Add(testTokenTTL).Unix())}, []string{"exp"}, member},
		{"exp with exponent", []string{fmt.Sprintf(`"exp":%.6e`, float64(testNow.Add(testTokenTTL).Unix()))}, []string{"exp"}, member},
		{"aud array", []string{claimMember(t, "aud", []string{"other-service", testAudience})}, []string{"aud"}, member},
		{"escaped claim name", []string{`"\u0073ub":"` + testUserID + `"`}, []string{"sub"}, member},
		{"unknown claims", []string{`"groups":["a",1]`, `"Roles":{"x":true}`, `"scope":"read"`, `"jti":7`}, nil, member},
		{"operator", []string{`"platform_admin":true`}, []string{ClaimAccountID, ClaimRole},
			principal.Principal{Kind: principal.Operator, UserID: testUserID}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			members := append(memberClaimMembers(t, tt.omit...), tt.extra...)
			ctx, err := a.Authenticate(bearer(signRaw(t, `{"alg":"HS256","typ":"JWT"}`, claimsJSON(members...))))
			require.NoError(t, err)

			got, ok := principal.FromContext(ctx)
			require.True(t, ok)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestAuthenticateJWTHeaders(t *testing.T) {
	t.Parallel()

	a := newTestAuthenticator(t, testConfig(t, nil))

	rejected := []struct {
		name    string
		header  map[string]any
		message string
	}{
		{"crit naming a claim", map[string]any{"crit": []string{"exp"}, "exp": 1}, "JWT has a crit header"},
		{"crit empty", map[string]any{"crit": []string{}}, "JWT has a crit header"},
		{"typ JOSE", map[string]any{"typ": "JOSE"}, `JWT typ header must be "JWT" or "at+jwt"`},
		{"typ other media type", map[string]any{"typ": "application/json"}, `JWT typ header must be "JWT" or "at+jwt"`},
		{"typ empty", map[string]any{"typ": ""}, `JWT typ header must be "JWT" or "at+jwt"`},
		{"typ number", map[string]any{"typ": 1}, `JWT typ header must be "JWT" or "at+jwt"`},
	}
	for _, tt := range rejected {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			_, err := a.Authenticate(bearer(signWithHeader(t, tt.header, testClaims())))

			assert.Equal(t, codes.Unauthenticated, status.Code(err))
			assert.Contains(t, status.Convert(err).Message(), tt.message)
		})
	}

	t.Run("crit on RS256", func(t *testing.T) {
		t.Parallel()

		token := jwt.NewWithClaims(jwt.SigningMethodRS256, testClaims())
		token.Header["kid"] = rsaKeyID
		token.Header["crit"] = []string{"b64"}
		signed, err := token.SignedString(loadTestKeys(t).rsa)
		require.NoError(t, err)

		_, err = a.Authenticate(bearer(signed))
		assert.Equal(t, codes.Unauthenticated, status.Code(err))
		assert.Contains(t, status.Convert(err).Message(), "JWT has a crit header")
	})

	accepted := []struct {
		name string
		typ  any
	}{
		{"no typ", nil},
		{"typ JWT", "JWT"},
		{"typ jwt", "jwt"},
		{"typ at+jwt", "at+jwt"},
		{"typ AT+JWT", "AT+JWT"},
		{"typ application/jwt", "application/jwt"},
		{"typ application/at+jwt", "application/at+jwt"},
	}
	for _, tt := range accepted {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			_, err := a.Authenticate(bearer(signWithHeader(t, map[string]any{"typ": tt.typ}, testClaims())))

			assert.NoError(t, err)
		})
	}
}

func TestAuthenticateJWTBlankSubject(t *testing.T) {
	t.Parallel()

	a := newTestAuthenticator(t, testConfig(t, nil))

	for _, subject := range []string{" ", "   ", "\t", " \n "} {
		claims := testClaims()
		claims.Subject = subject

		_, err := a.Authenticate(bearer(signJWT(t, jwt.SigningMethodHS256, testSecret, "", claims)))

		assert.Equal(t, codes.Unauthenticated, status.Code(err), "%q", subject)
		assert.Contains(t, status.Convert(err).Message(), "JWT sub claim is blank", "%q", subject)
	}

	operator := testClaims()
	operator.Subject = "  "
	operator.PlatformAdmin = true
	_, err := a.Authenticate(bearer(signJWT(t, jwt.SigningMethodHS256, testSecret, "", operator)))
	assert.Equal(t, codes.Unauthenticated, status.Code(err), "operator with a blank sub")

	blankAccount := testClaims()
	blankAccount.AccountID = "  "
	_, err = a.Authenticate(bearer(signJWT(t, jwt.SigningMethodHS256, testSecret, "", blankAccount)))
	assert.Equal(t, codes.Unauthenticated, status.Code(err), "user with a blank account_id")
	assert.Contains(t, status.Convert(err).Message(), "JWT account_id claim is blank")
}

// paddedJWT returns the longest valid member JWT of at most size bytes,
// padded with an unknown claim. Base64url has no text of 4n+1 characters,
// so the JWT can be one byte shorter than size.
func paddedJWT(t *testing.T, size int) string {
	t.Helper()

	type paddedClaims struct {
		jwtClaims
		Padding string `json:"padding"`
	}

	claims := paddedClaims{jwtClaims: testClaims()}
	base := len(signJWT(t, jwt.SigningMethodHS256, testSecret, "", claims))
	// Each 3 bytes of padding add 4 base64url characters.
	for n := (size - base + 8) * 3 / 4; n >= 0; n-- {
		claims.Padding = strings.Repeat("p", n)
		token := signJWT(t, jwt.SigningMethodHS256, testSecret, "", claims)
		if len(token) <= size {
			require.GreaterOrEqual(t, len(token), size-1)
			return token
		}
	}
	t.Fatalf("no padding gives a JWT of at most %d bytes", size)

	return ""
}

func TestAuthenticateCredentialTooLong(t *testing.T) {
	t.Parallel()

	store := newMemTokenStore()
	a := newTestAuthenticator(t, testConfig(t, store))

	_, err := a.Authenticate(bearer(paddedJWT(t, MaxJWTBytes)))
	require.NoError(t, err, "a JWT of MaxJWTBytes or one byte less is accepted")

	overLimit := paddedJWT(t, MaxJWTBytes+2)
	require.Greater(t, len(overLimit), MaxJWTBytes)

	tests := []struct {
		name  string
		pairs []string
	}{
		{"valid JWT just over", []string{MetadataAuthorization, "Bearer " + overLimit}},
		{"valid JWT far over", []string{MetadataAuthorization, "Bearer " + paddedJWT(t, 4*MaxJWTBytes)}},
		{"1 MiB of bearer", []string{MetadataAuthorization, "Bearer " + strings.Repeat("a", 1<<20)}},
		{"1 MiB without scheme", []string{MetadataAuthorization, strings.Repeat("a", 1<<20)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			_, err := a.Authenticate(incoming(tt.pairs...))

			assert.Equal(t, codes.Unauthenticated, status.Code(err))
			message := status.Convert(err).Message()
			assert.Contains(t, message, fmt.Sprintf("a bearer JWT may have at most %d bytes", MaxJWTBytes))
			assert.Less(t, len(message), 200, "the message must not echo the credential")
		})
	}

	t.Run("1 MiB service token", func(t *testing.T) {
		t.Parallel()

		_, err := a.Authenticate(incoming(MetadataServiceToken, ServiceTokenPrefix+strings.Repeat("a", 1<<20)))

		assert.Equal(t, codes.Unauthenticated, status.Code(err))
		assert.Contains(t, status.Convert(err).Message(), "malformed")
		assert.Less(t, len(status.Convert(err).Message()), 200, "the message must not echo the credential")
		assert.Equal(t, 0, store.lookupCount())
	})
}

// TestAuthenticateJWTExpiryUnchanged checks that exp is still compared to
// the second, with the leeway, after the strict claim decoding.
func TestAuthenticateJWTExpiryUnchanged(t *testing.T) {
	t.Parallel()

	a := newTestAuthenticator(t, testConfig(t, nil))

	claims := testClaims()
	claims.ExpiresAt = jwt.NewNumericDate(testNow.Add(-DefaultLeeway - time.Second))
	_, err := a.Authenticate(bearer(signJWT(t, jwt.SigningMethodHS256, testSecret, "", claims)))
	assert.Equal(t, codes.Unauthenticated, status.Code(err), "expired beyond the leeway")

	claims.ExpiresAt = jwt.NewNumericDate(testNow.Add(-DefaultLeeway + time.Second))
	_, err = a.Authenticate(bearer(signJWT(t, jwt.SigningMethodHS256, testSecret, "", claims)))
	assert.NoError(t, err, "expired within the leeway")
}
