package auth

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/MicahParks/jwkset"
	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/metering/metering/internal/principal"
)

func TestAuthenticateJWTAccepted(t *testing.T) {
	t.Parallel()

	keys := loadTestKeys(t)
	a := newTestAuthenticator(t, testConfig(t, nil))

	operatorClaims := testClaims()
	operatorClaims.Subject = testOperator
	operatorClaims.AccountID = ""
	operatorClaims.Role = ""
	operatorClaims.PlatformAdmin = true

	adminClaims := testClaims()
	adminClaims.Role = RoleAdmin

	withinLeeway := testClaims()
	withinLeeway.ExpiresAt = jwt.NewNumericDate(testNow.Add(-10 * time.Second))
	withinLeeway.NotBefore = jwt.NewNumericDate(testNow.Add(10 * time.Second))
	withinLeeway.IssuedAt = jwt.NewNumericDate(testNow.Add(10 * time.Second))

	severalAudiences := testClaims()
	severalAudiences.Audience = jwt.ClaimStrings{"other-service", testAudience}

	member := principal.Principal{Kind: principal.User, UserID: testUserID, AccountID: ownAccount, Role: RoleMember}

	tests := []struct {
		name  string
		token string
		want  principal.Principal
	}{
		{"HS256 member", signJWT(t, jwt.SigningMethodHS256, testSecret, "", testClaims()), member},
		{"HS256 admin", signJWT(t, jwt.SigningMethodHS256, testSecret, "", adminClaims),
			principal.Principal{Kind: principal.User, UserID: testUserID, AccountID: ownAccount, Role: RoleAdmin}},
		{"HS256 operator", signJWT(t, jwt.SigningMethodHS256, testSecret, "", operatorClaims),
			principal.Principal{Kind: principal.Operator, UserID: testOperator}},
		{"RS256 with kid", signJWT(t, jwt.SigningMethodRS256, keys.rsa, rsaKeyID, testClaims()), member},
		{"ES256 with kid", signJWT(t, jwt.SigningMethodES256, keys.ecdsa, ecdsaKeyID, testClaims()), member},
		{"EdDSA with kid", signJWT(t, jwt.SigningMethodEdDSA, keys.ed25519, ed25519KeyID, testClaims()), member},
		{"RS256 without kid", signJWT(t, jwt.SigningMethodRS256, keys.rsa, "", testClaims()), member},
		{"ES256 without kid", signJWT(t, jwt.SigningMethodES256, keys.ecdsa, "", testClaims()), member},
		{"EdDSA without kid", signJWT(t, jwt.SigningMethodEdDSA, keys.ed25519, "", testClaims()), member},
		{"times within leeway", signJWT(t, jwt.SigningMethodHS256, testSecret, "", withinLeeway), member},
		{"audience among several", signJWT(t, jwt.SigningMethodHS256, testSecret, "", severalAudiences), member},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			ctx, err := a.Authenticate(bearer(tt.token))
			require.NoError(t, err)

			got, ok := principal.FromContext(ctx)
			require.True(t, ok)
			assert.Equal(t, tt.want, got)
		})
	}
}

func TestAuthenticateJWTRejected(t *testing.T) {
	t.Parallel()

	keys := loadTestKeys(t)
	a := newTestAuthenticator(t, testConfig(t, nil))
	jwksOnly := testConfig(t, nil)
	jwksOnly.HS256Secret = nil
	jwksOnlyAuthenticator := newTestAuthenticator(t, jwksOnly)

	expired := testClaims()
	expired.ExpiresAt = jwt.NewNumericDate(testNow.Add(-time.Minute))
	notYetValid := testClaims()
	notYetValid.NotBefore = jwt.NewNumericDate(testNow.Add(time.Minute))
	issuedInFuture := testClaims()
	issuedInFuture.IssuedAt = jwt.NewNumericDate(testNow.Add(time.Minute))
	noExpiry := testClaims()
	noExpiry.ExpiresAt = nil
	wrongIssuer := testClaims()
	wrongIssuer.Issuer = "https://evil.test"
	noIssuer := testClaims()
	noIssuer.Issuer = ""
	wrongAudience := testClaims()
	wrongAudience.Audience = jwt.ClaimStrings{"other-service"}
	noAudience := testClaims()
	noAudience.Audience = nil
	noSubject := testClaims()
	noSubject.Subject = ""
	noAccount := testClaims()
	noAccount.AccountID = ""
	badRole := testClaims()
	badRole.Role = "owner"
	noRole := testClaims()
	noRole.Role = ""

	otherRSA, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	require.NoError(t, err)

	valid := signJWT(t, jwt.SigningMethodRS256, keys.rsa, rsaKeyID, testClaims())
	parts := strings.Split(valid, ".")
	elevated := testClaims()
	elevated.AccountID = otherAccount
	forgedPayload := parts[0] + "." + strings.Split(signJWT(t, jwt.SigningMethodRS256, otherRSA, rsaKeyID, elevated), ".")[1] + "." + parts[2]

	tests := []struct {
		name          string
		authenticator *Authenticator
		token         string
		message       string
	}{
		{"expired", a, signJWT(t, jwt.SigningMethodHS256, testSecret, "", expired), "JWT is expired"},
		{"not yet valid", a, signJWT(t, jwt.SigningMethodHS256, testSecret, "", notYetValid), "nbf claim is in the future"},
		{"issued in future", a, signJWT(t, jwt.SigningMethodHS256, testSecret, "", issuedInFuture), "iat claim is in the future"},
		{"no expiry", a, signJWT(t, jwt.SigningMethodHS256, testSecret, "", noExpiry), "no exp claim"},
		{"wrong issuer", a, signJWT(t, jwt.SigningMethodHS256, testSecret, "", wrongIssuer), "iss claim"},
		{"no issuer", a, signJWT(t, jwt.SigningMethodHS256, testSecret, "", noIssuer), "no iss claim"},
		{"wrong audience", a, signJWT(t, jwt.SigningMethodHS256, testSecret, "", wrongAudience), "aud claim"},
		{"no audience", a, signJWT(t, jwt.SigningMethodHS256, testSecret, "", noAudience), "no aud claim"},
		{"no subject", a, signJWT(t, jwt.SigningMethodHS256, testSecret, "", noSubject), "no sub claim"},
		{"no account", a, signJWT(t, jwt.SigningMethodHS256, testSecret, "", noAccount), "no account_id claim"},
		{"unknown role", a, signJWT(t, jwt.SigningMethodHS256, testSecret, "", badRole), "role claim"},
		{"no role", a, signJWT(t, jwt.SigningMethodHS256, testSecret, "", noRole), "role claim"},
		{"platform_admin of wrong type", a, signMap(t, map[string]any{
			"sub": testOperator, "iss": testIssuer, "aud": testAudience, "exp": testNow.Add(time.Hour).Unix(),
			"platform_admin": "true",
		}), "wrong type"},
		{"alg none", a, signJWT(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, "", testClaims()), "signing algorithm is not accepted"},
		{"alg RS512", a, signJWT(t, jwt.SigningMethodRS512, keys.rsa, rsaKeyID, testClaims()), "signing algorithm is not accepted"},
		{"HS256 with wrong secret", a, signJWT(t, jwt.SigningMethodHS256, []byte("another-secret-of-at-least-32-bytes!"), "", testClaims()), "signature is invalid"},
		{"RS256 signed by another key", a, signJWT(t, jwt.SigningMethodRS256, otherRSA, rsaKeyID, testClaims()), "signature is invalid"},
		{"RS256 signed by another key without kid", a, signJWT(t, jwt.SigningMethodRS256, otherRSA, "", testClaims()), "signature is invalid"},
		{"forged payload", a, forgedPayload, "signature is invalid"},
		{"unknown kid", a, signJWT(t, jwt.SigningMethodRS256, keys.rsa, "no-such-key", testClaims()), "no matching key"},
		{"RS256 naming the EC key", a, signJWT(t, jwt.SigningMethodRS256, keys.rsa, ecdsaKeyID, testClaims()), "no matching key"},
		{"ES384 key", a, signJWT(t, jwt.SigningMethodES384, p384, "", testClaims()), "signing algorithm is not accepted"},
		{"HS256 on server without secret", jwksOnlyAuthenticator, signJWT(t, jwt.SigningMethodHS256, testSecret, "", testClaims()), "signing algorithm is not accepted"},
		{"not a JWT", a, "not-a-jwt", "JWT is malformed"},
		{"two parts", a, parts[0] + "." + parts[1], "JWT is malformed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			_, err := tt.authenticator.Authenticate(bearer(tt.token))
			require.Error(t, err)

			assert.Equal(t, codes.Unauthenticated, status.Code(err))
			assert.Contains(t, status.Convert(err).Message(), tt.message)
			assert.NotContains(t, status.Convert(err).Message(), tt.token)
		})
	}
}

// TestAuthenticateJWTHMACConfusion checks that an HS256 token whose HMAC key
// is the public RSA key, in each form an attacker can get it, is rejected by
// a server with the JWKS alone and by one with an HS256 secret as well.
func TestAuthenticateJWTHMACConfusion(t *testing.T) {
	t.Parallel()

	keys := loadTestKeys(t)
	der, err := x509.MarshalPKIXPublicKey(&keys.rsa.PublicKey)
	require.NoError(t, err)
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	modulus := []byte(base64.RawURLEncoding.EncodeToString(keys.rsa.N.Bytes()))

	jwksOnly := testConfig(t, nil)
	jwksOnly.HS256Secret = nil
	authenticators := map[string]*Authenticator{
		"JWKS only":      newTestAuthenticator(t, jwksOnly),
		"JWKS and HS256": newTestAuthenticator(t, testConfig(t, nil)),
	}
	hmacKeys := map[string][]byte{
		"PEM":       pemBytes,
		"DER":       der,
		"JWKS JSON": keys.jwks,
		"modulus":   modulus,
	}

	for authName, a := range authenticators {
		for keyName, hmacKey := range hmacKeys {
			for _, kid := range []string{rsaKeyID, ""} {
				t.Run(authName+"/"+keyName+"/kid "+kid, func(t *testing.T) {
					t.Parallel()

					token := signJWT(t, jwt.SigningMethodHS256, hmacKey, kid, testClaims())
					_, err := a.Authenticate(bearer(token))

					assert.Equal(t, codes.Unauthenticated, status.Code(err))
				})
			}
		}
	}
}

func TestParseJWKSSkipsAndRejects(t *testing.T) {
	t.Parallel()

	keys := loadTestKeys(t)
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	require.NoError(t, err)
	smallRSA, err := rsa.GenerateKey(rand.Reader, 1024)
	require.NoError(t, err)

	t.Run("unusable keys skipped", func(t *testing.T) {
		t.Parallel()

		raw := buildJWKS(t,
			publicJWK{key: &p384.PublicKey, kid: "p384", alg: jwkset.AlgES384},
			publicJWK{key: &keys.rsa.PublicKey, kid: "enc", use: jwkset.UseEnc},
			publicJWK{key: &keys.rsa.PublicKey, kid: "ps256", alg: jwkset.AlgPS256},
			publicJWK{key: &smallRSA.PublicKey, kid: "small"},
			publicJWK{key: &keys.rsa.PublicKey, kid: rsaKeyID, alg: jwkset.AlgRS256},
		)

		parsed, err := parseJWKS(raw)
		require.NoError(t, err)

		all, err := parsed.storage.KeyReadAll(t.Context())
		require.NoError(t, err)
		assert.Len(t, all, 1)
		var skippedIDs []string
		for _, s := range parsed.skipped {
			skippedIDs = append(skippedIDs, s.kid)
		}
		assert.ElementsMatch(t, []string{"p384", "enc", "ps256", "small"}, skippedIDs)
	})

	t.Run("no usable key", func(t *testing.T) {
		t.Parallel()

		raw := buildJWKS(t, publicJWK{key: &p384.PublicKey, kid: "p384"})

		_, err := parseJWKS(raw)
		assert.ErrorContains(t, err, "no RS256, ES256 or EdDSA signing key")
	})

	t.Run("symmetric key", func(t *testing.T) {
		t.Parallel()

		raw := mustJSON(t, map[string]any{"keys": []map[string]any{
			{"kty": "oct", "kid": "hmac", "k": base64.RawURLEncoding.EncodeToString(testSecret)},
		}})

		_, err := parseJWKS(raw)
		assert.ErrorContains(t, err, "symmetric keys")
	})

	t.Run("not JSON", func(t *testing.T) {
		t.Parallel()

		_, err := parseJWKS([]byte("-----BEGIN PUBLIC KEY-----"))
		assert.ErrorContains(t, err, "parse JWKS JSON")
	})

	t.Run("empty set", func(t *testing.T) {
		t.Parallel()

		_, err := parseJWKS([]byte(`{"keys": []}`))
		assert.ErrorContains(t, err, "JWKS has no keys")
	})

	t.Run("private key material dropped", func(t *testing.T) {
		t.Parallel()

		jwk, err := jwkset.NewJWKFromKey(keys.ecdsa, jwkset.JWKOptions{
			Marshal:  jwkset.JWKMarshalOptions{Private: true},
			Metadata: jwkset.JWKMetadataOptions{KID: ecdsaKeyID},
		})
		require.NoError(t, err)
		raw := mustJSON(t, map[string]any{"keys": []any{jwk.Marshal()}})

		parsed, err := parseJWKS(raw)
		require.NoError(t, err)

		all, err := parsed.storage.KeyReadAll(t.Context())
		require.NoError(t, err)
		require.Len(t, all, 1)
		_, isPublic := all[0].Key().(*ecdsa.PublicKey)
		assert.True(t, isPublic)
	})
}

func TestMintDevJWT(t *testing.T) {
	t.Parallel()

	a := newTestAuthenticator(t, testConfig(t, nil))

	t.Run("user", func(t *testing.T) {
		t.Parallel()

		token, err := MintDevJWT(testSecret, testIssuer, testAudience,
			DevClaims{Subject: testUserID, AccountID: ownAccount, Role: RoleAdmin}, testNow, time.Hour)
		require.NoError(t, err)

		ctx, err := a.Authenticate(bearer(token))
		require.NoError(t, err)
		got, _ := principal.FromContext(ctx)
		assert.Equal(t, principal.Principal{Kind: principal.User, UserID: testUserID, AccountID: ownAccount, Role: RoleAdmin}, got)
	})

	t.Run("operator", func(t *testing.T) {
		t.Parallel()

		token, err := MintDevJWT(testSecret, testIssuer, testAudience,
			DevClaims{Subject: testOperator, PlatformAdmin: true}, testNow, time.Hour)
		require.NoError(t, err)

		ctx, err := a.Authenticate(bearer(token))
		require.NoError(t, err)
		got, _ := principal.FromContext(ctx)
		assert.Equal(t, principal.Principal{Kind: principal.Operator, UserID: testOperator}, got)
	})

	t.Run("expires after ttl", func(t *testing.T) {
		t.Parallel()

		token, err := MintDevJWT(testSecret, testIssuer, testAudience,
			DevClaims{Subject: testUserID, AccountID: ownAccount, Role: RoleMember}, testNow.Add(-2*time.Hour), time.Hour)
		require.NoError(t, err)

		_, err = a.Authenticate(bearer(token))
		assert.Equal(t, codes.Unauthenticated, status.Code(err))
	})

	t.Run("invalid input", func(t *testing.T) {
		t.Parallel()

		_, err := MintDevJWT([]byte("short"), "", "", DevClaims{Role: "owner"}, testNow, 0)
		require.Error(t, err)

		for _, want := range []string{"secret has 5 bytes", "issuer is required", "audience is required",
			"subject is required", "ttl is 0s", "account id is required", `role is "owner"`} {
			assert.ErrorContains(t, err, want)
		}
	})
}

func TestParseJWKSDuplicateKeyID(t *testing.T) {
	t.Parallel()

	keys := loadTestKeys(t)
	otherRSA, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)

	rejected := []struct {
		name string
		jwks []byte
	}{
		{"two RSA keys", buildJWKS(t,
			publicJWK{key: &keys.rsa.PublicKey, kid: rsaKeyID, alg: jwkset.AlgRS256},
			publicJWK{key: &otherRSA.PublicKey, kid: rsaKeyID, alg: jwkset.AlgRS256},
		)},
		{"RSA and EC keys", buildJWKS(t,
			publicJWK{key: &keys.rsa.PublicKey, kid: rsaKeyID},
			publicJWK{key: &keys.ecdsa.PublicKey, kid: ecdsaKeyID},
			publicJWK{key: &otherRSA.PublicKey, kid: ecdsaKeyID},
		)},
	}
	for _, tt := range rejected {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			_, err := parseJWKS(tt.jwks)
			assert.ErrorContains(t, err, "kid")

			cfg := Config{Issuer: testIssuer, Audience: testAudience, JWKS: tt.jwks}
			err = cfg.Validate()
			assert.ErrorContains(t, err, "JWKS is invalid")
			assert.ErrorContains(t, err, "share the kid")

			_, err = New(cfg)
			assert.Error(t, err)
		})
	}

	t.Run("error names the kid and the keys", func(t *testing.T) {
		t.Parallel()

		_, err := parseJWKS(rejected[1].jwks)
		assert.ErrorContains(t, err, `JWKS keys 1 and 2 share the kid "ec-1"`)
	})

	accepted := []struct {
		name string
		jwks []byte
	}{
		{"skipped encryption key with the same kid", buildJWKS(t,
			publicJWK{key: &otherRSA.PublicKey, kid: rsaKeyID, use: jwkset.UseEnc},
			publicJWK{key: &keys.rsa.PublicKey, kid: rsaKeyID, alg: jwkset.AlgRS256},
		)},
		{"two keys without kid", buildJWKS(t,
			publicJWK{key: &keys.rsa.PublicKey},
			publicJWK{key: &otherRSA.PublicKey},
		)},
	}
	for _, tt := range accepted {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			_, err := parseJWKS(tt.jwks)
			require.NoError(t, err)

			a := newTestAuthenticator(t, Config{Issuer: testIssuer, Audience: testAudience, JWKS: tt.jwks, Now: func() time.Time { return testNow }})
			_, err = a.Authenticate(bearer(signJWT(t, jwt.SigningMethodRS256, keys.rsa, "", testClaims())))
			assert.NoError(t, err)
		})
	}
}

// TestNewPrivateJWKUsedAsPublic checks that a JWKS key with private key
// material is loaded as its public key alone, with a warning that names
// the key and not the material.
func TestNewPrivateJWKUsedAsPublic(t *testing.T) {
	t.Parallel()

	keys := loadTestKeys(t)
	private := []struct {
		key    any
		kid    string
		method jwt.SigningMethod
	}{
		{keys.rsa, rsaKeyID, jwt.SigningMethodRS256},
		{keys.ecdsa, ecdsaKeyID, jwt.SigningMethodES256},
		{keys.ed25519, ed25519KeyID, jwt.SigningMethodEdDSA},
	}

	var marshalled []any
	var secrets []string
	for _, p := range private {
		jwk, err := jwkset.NewJWKFromKey(p.key, jwkset.JWKOptions{
			Marshal:  jwkset.JWKMarshalOptions{Private: true},
			Metadata: jwkset.JWKMetadataOptions{KID: p.kid},
		})
		require.NoError(t, err)
		require.NotEmpty(t, jwk.Marshal().D, "the test JWK must contain private key material")
		marshalled = append(marshalled, jwk.Marshal())
		secrets = append(secrets, jwk.Marshal().D)
	}
	raw := mustJSON(t, map[string]any{"keys": marshalled})

	parsed, err := parseJWKS(raw)
	require.NoError(t, err)
	all, err := parsed.storage.KeyReadAll(t.Context())
	require.NoError(t, err)
	require.Len(t, all, 3)
	for _, jwk := range all {
		assert.True(t, keyFitsAnyAlgorithm(jwk.Key()), "kid %s must be a public key, got %T", jwk.Marshal().KID, jwk.Key())
		assert.Empty(t, jwk.Marshal().D, "kid %s", jwk.Marshal().KID)
	}

	var logged bytes.Buffer
	a := newTestAuthenticator(t, Config{
		Issuer: testIssuer, Audience: testAudience, JWKS: raw,
		Now:    func() time.Time { return testNow },
		Logger: slog.New(slog.NewTextHandler(&logged, nil)),
	})

	for _, p := range private {
		assert.Contains(t, logged.String(), "kid="+p.kid)
		_, err := a.Authenticate(bearer(signJWT(t, p.method, p.key, p.kid, testClaims())))
		assert.NoError(t, err, p.kid)
	}
	assert.Equal(t, 3, strings.Count(logged.String(), "JWKS key contains private key material"))
	for _, secret := range secrets {
		assert.NotContains(t, logged.String(), secret)
	}
}
