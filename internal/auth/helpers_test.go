package auth

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/MicahParks/jwkset"
	"github.com/golang-jwt/jwt/v5"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/metadata"
)

// Test settings shared by the tests of this package.
const (
	testIssuer    = "https://issuer.test"
	testAudience  = "metering-test"
	ownAccount    = "acct-a"
	otherAccount  = "acct-b"
	testUserID    = "user-1"
	testOperator  = "operator-1"
	rsaKeyID      = "rsa-1"
	ecdsaKeyID    = "ec-1"
	ed25519KeyID  = "ed-1"
	testTokenTTL  = time.Hour
	testCacheTTL  = 200 * time.Millisecond
	testFlushTick = 20 * time.Millisecond
)

var (
	testSecret = []byte("0123456789abcdef0123456789abcdef-dev-secret")
	// testNow is the fixed time of the injected clock.
	testNow = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
)

// testKeys are the signing keys of the JWKS used by the tests.
type testKeys struct {
	rsa     *rsa.PrivateKey
	ecdsa   *ecdsa.PrivateKey
	ed25519 ed25519.PrivateKey
	jwks    []byte
}

var (
	keysOnce   sync.Once
	sharedKeys testKeys
)

// loadTestKeys generates the RSA, ECDSA and Ed25519 keys once per test
// binary and writes their public halves to a JWKS with jwkset.
func loadTestKeys(t *testing.T) testKeys {
	t.Helper()

	keysOnce.Do(func() {
		rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
		require.NoError(t, err)
		ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		_, edKey, err := ed25519.GenerateKey(rand.Reader)
		require.NoError(t, err)

		sharedKeys = testKeys{
			rsa:     rsaKey,
			ecdsa:   ecKey,
			ed25519: edKey,
			jwks: buildJWKS(t,
				publicJWK{key: &rsaKey.PublicKey, kid: rsaKeyID, alg: jwkset.AlgRS256},
				publicJWK{key: &ecKey.PublicKey, kid: ecdsaKeyID, alg: jwkset.AlgES256},
				publicJWK{key: edKey.Public(), kid: ed25519KeyID, alg: jwkset.AlgEdDSA},
			),
		}
	})
	require.NotEmpty(t, sharedKeys.jwks, "test keys failed to generate")

	return sharedKeys
}

// publicJWK is one key of a JWKS built by buildJWKS.
type publicJWK struct {
	key any
	kid string
	alg jwkset.ALG
	use jwkset.USE
}

// buildJWKS returns the JSON of a JWKS with keys, written by jwkset.
func buildJWKS(t *testing.T, keys ...publicJWK) []byte {
	t.Helper()

	storage := jwkset.NewMemoryStorage()
	for _, k := range keys {
		jwk, err := jwkset.NewJWKFromKey(k.key, jwkset.JWKOptions{
			Metadata: jwkset.JWKMetadataOptions{KID: k.kid, ALG: k.alg, USE: k.use},
		})
		require.NoError(t, err)
		require.NoError(t, storage.KeyWrite(context.Background(), jwk))
	}

	raw, err := storage.JSONPublic(context.Background())
	require.NoError(t, err)

	return raw
}

// testClaims returns valid claims of a member of ownAccount at testNow.
func testClaims() jwtClaims {
	return jwtClaims{
		RegisteredClaims: jwt.RegisteredClaims{
			Subject:   testUserID,
			Issuer:    testIssuer,
			Audience:  jwt.ClaimStrings{testAudience},
			IssuedAt:  jwt.NewNumericDate(testNow),
			NotBefore: jwt.NewNumericDate(testNow),
			ExpiresAt: jwt.NewNumericDate(testNow.Add(testTokenTTL)),
		},
		AccountID: ownAccount,
		Role:      RoleMember,
	}
}

// signJWT signs claims with method and key, setting the kid header when
// kid is not empty.
func signJWT(t *testing.T, method jwt.SigningMethod, key any, kid string, claims jwt.Claims) string {
	t.Helper()

	token := jwt.NewWithClaims(method, claims)
	if kid != "" {
		token.Header["kid"] = kid
	}
	signed, err := token.SignedString(key)
	require.NoError(t, err)

	return signed
}

// signMap signs raw claims, for claims that jwtClaims cannot express.
func signMap(t *testing.T, claims map[string]any) string {
	t.Helper()

	return signJWT(t, jwt.SigningMethodHS256, testSecret, "", jwt.MapClaims(claims))
}

// memTokenStore is an in-memory TokenStore that counts its calls.
type memTokenStore struct {
	mu       sync.Mutex
	tokens   map[[32]byte]ServiceToken
	lookups  int
	lookupFn func(ctx context.Context) error // runs before each lookup when set
	readFn   func(ctx context.Context) error // runs after each lookup has read the token, when set
	markErr  error
	marked   map[string]time.Time
	marks    int
}

func newMemTokenStore() *memTokenStore {
	return &memTokenStore{tokens: make(map[[32]byte]ServiceToken), marked: make(map[string]time.Time)}
}

// issue generates a token, stores it and returns its plaintext.
func (s *memTokenStore) issue(t *testing.T, token ServiceToken) string {
	t.Helper()

	plaintext, hash, err := GenerateServiceToken()
	require.NoError(t, err)

	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokens[hash] = token

	return plaintext
}

func (s *memTokenStore) revoke(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()

	for hash, token := range s.tokens {
		if token.ID == id {
			token.Revoked = true
			s.tokens[hash] = token
		}
	}
}

func (s *memTokenStore) setLookupFn(fn func(ctx context.Context) error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lookupFn = fn
}

func (s *memTokenStore) setMarkErr(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.markErr = err
}

func (s *memTokenStore) setReadFn(fn func(ctx context.Context) error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.readFn = fn
}

func (s *memTokenStore) lookupCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lookups
}

func (s *memTokenStore) markedAt(id string) (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	at, ok := s.marked[id]
	return at, ok
}

func (s *memTokenStore) LookupServiceToken(ctx context.Context, hash [32]byte) (ServiceToken, error) {
	s.mu.Lock()
	s.lookups++
	fn := s.lookupFn
	s.mu.Unlock()

	if fn != nil {
		if err := fn(ctx); err != nil {
			return ServiceToken{}, err
		}
	}

	s.mu.Lock()
	token, ok := s.tokens[hash]
	readFn := s.readFn
	s.mu.Unlock()

	if readFn != nil {
		if err := readFn(ctx); err != nil {
			return ServiceToken{}, err
		}
	}
	if !ok {
		return ServiceToken{}, ErrTokenNotFound
	}

	return token, nil
}

func (s *memTokenStore) MarkServiceTokensUsed(_ context.Context, ids []string, at time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()

	s.marks++
	if s.markErr != nil {
		return s.markErr
	}
	for _, id := range ids {
		s.marked[id] = at
	}

	return nil
}

// testConfig returns a Config with the HS256 secret, the test JWKS, store
// and a fixed clock.
func testConfig(t *testing.T, store TokenStore) Config {
	t.Helper()

	return Config{
		Issuer:                testIssuer,
		Audience:              testAudience,
		HS256Secret:           testSecret,
		JWKS:                  loadTestKeys(t).jwks,
		Tokens:                store,
		TokenCacheTTL:         testCacheTTL,
		LastUsedFlushInterval: testFlushTick,
		Now:                   func() time.Time { return testNow },
	}
}

func newTestAuthenticator(t *testing.T, cfg Config) *Authenticator {
	t.Helper()

	a, err := New(cfg)
	require.NoError(t, err)

	return a
}

// incoming returns a context with incoming metadata made of key/value pairs.
func incoming(pairs ...string) context.Context {
	return metadata.NewIncomingContext(context.Background(), metadata.Pairs(pairs...))
}

// bearer returns an incoming context with the JWT as bearer credential.
func bearer(token string) context.Context {
	return incoming(MetadataAuthorization, "Bearer "+token)
}

// mustJSON marshals v, for hand-written JWKS documents.
func mustJSON(t *testing.T, v any) []byte {
	t.Helper()

	raw, err := json.Marshal(v)
	require.NoError(t, err)

	return raw
}

// signRaw signs header and payload, two JSON texts written by the test,
// with the HS256 test secret. It builds JWTs that jwt.Token cannot express,
// such as claim sets with repeated names.
func signRaw(t *testing.T, header, payload string) string {
	t.Helper()

	signingString := base64.RawURLEncoding.EncodeToString([]byte(header)) + "." +
		base64.RawURLEncoding.EncodeToString([]byte(payload))
	signature, err := jwt.SigningMethodHS256.Sign(signingString, testSecret)
	require.NoError(t, err)

	return signingString + "." + base64.RawURLEncoding.EncodeToString(signature)
}

// signWithHeader signs claims with the HS256 test secret after setting the
// header parameters in header. A nil value removes the parameter.
func signWithHeader(t *testing.T, header map[string]any, claims jwt.Claims) string {
	t.Helper()

	token := jwt.NewWithClaims(jwt.SigningMethodHS256, claims)
	for name, value := range header {
		if value == nil {
			delete(token.Header, name)
			continue
		}
		token.Header[name] = value
	}
	signed, err := token.SignedString(testSecret)
	require.NoError(t, err)

	return signed
}
