package auth

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/MicahParks/jwkset"
	"github.com/MicahParks/keyfunc/v3"
	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/metering/metering/internal/principal"
)

// Accepted JWT signing algorithms, as named in the alg header.
const (
	algHS256 = "HS256"
	algRS256 = "RS256"
	algES256 = "ES256"
	algEdDSA = "EdDSA"
)

// minRSABits is the smallest RSA modulus accepted in a JWKS.
const minRSABits = 2048

// jwtVerifier checks JWTs against the configured keys. It is safe for
// concurrent use.
type jwtVerifier struct {
	parser      *jwt.Parser
	hs256Secret []byte
	jwks        keyfunc.Keyfunc // nil when Config.JWKS is empty
	algorithms  []string
}

// newJWTVerifier builds the verifier from cfg, which has its defaults set.
// It logs each JWKS key it skips and each key with private key material.
func newJWTVerifier(cfg Config) (*jwtVerifier, error) {
	v := &jwtVerifier{}

	if len(cfg.HS256Secret) > 0 {
		v.hs256Secret = slices.Clone(cfg.HS256Secret)
		v.algorithms = append(v.algorithms, algHS256)
	}

	if len(cfg.JWKS) > 0 {
		parsed, err := parseJWKS(cfg.JWKS)
		if err != nil {
			return nil, fmt.Errorf("load JWKS: %w", err)
		}
		for _, s := range parsed.skipped {
			cfg.Logger.Warn("skipped JWKS key", "key_index", s.index, "kid", s.kid, "reason", s.reason)
		}
		for _, p := range parsed.withPrivate {
			cfg.Logger.Warn("JWKS key contains private key material, which is ignored; keep private keys out of the JWKS file",
				"key_index", p.index, "kid", p.kid)
		}

		v.jwks, err = keyfunc.New(keyfunc.Options{Storage: parsed.storage})
		if err != nil {
			return nil, fmt.Errorf("load JWKS: %w", err)
		}
		v.algorithms = append(v.algorithms, algRS256, algES256, algEdDSA)
	}

	v.parser = jwt.NewParser(
		jwt.WithValidMethods(v.algorithms),
		jwt.WithIssuer(cfg.Issuer),
		jwt.WithAudience(cfg.Audience),
		jwt.WithLeeway(cfg.Leeway),
		jwt.WithExpirationRequired(),
		jwt.WithIssuedAt(),
		jwt.WithTimeFunc(cfg.Now),
	)

	return v, nil
}

// verify checks token and returns its principal, or an Unauthenticated
// status error that names the failed check.
func (v *jwtVerifier) verify(token string) (principal.Principal, error) {
	var claims jwtClaims
	if _, err := v.parser.ParseWithClaims(token, &claims, v.key); err != nil {
		return principal.Principal{}, status.Error(codes.Unauthenticated, v.rejectionMessage(err))
	}

	if claims.Subject == "" {
		return principal.Principal{}, status.Error(codes.Unauthenticated, "JWT has no sub claim; it must name the user")
	}
	if strings.TrimSpace(claims.Subject) == "" {
		return principal.Principal{}, status.Error(codes.Unauthenticated, "JWT sub claim is blank; it must name the user")
	}

	if claims.PlatformAdmin {
		return principal.Principal{Kind: principal.Operator, UserID: claims.Subject}, nil
	}

	if claims.AccountID == "" {
		return principal.Principal{}, status.Errorf(codes.Unauthenticated,
			"JWT has no %s claim; a user JWT must name the user's account", ClaimAccountID)
	}
	if strings.TrimSpace(claims.AccountID) == "" {
		return principal.Principal{}, status.Errorf(codes.Unauthenticated,
			"JWT %s claim is blank; a user JWT must name the user's account", ClaimAccountID)
	}
	if claims.Role != RoleMember && claims.Role != RoleAdmin {
		return principal.Principal{}, status.Errorf(codes.Unauthenticated,
			"JWT %s claim is %q; it must be %q or %q", ClaimRole, claims.Role, RoleMember, RoleAdmin)
	}

	return principal.Principal{
		Kind:      principal.User,
		UserID:    claims.Subject,
		AccountID: claims.AccountID,
		Role:      claims.Role,
	}, nil
}

// key checks the header of token and returns its verification key. The
// parser has already checked that the alg header is in the allow-list. Each
// algorithm gets only keys of its own type, so that an HS256 token can
// never be checked against a public key's bytes.
func (v *jwtVerifier) key(token *jwt.Token) (any, error) {
	if err := checkHeader(token.Header); err != nil {
		return nil, err
	}

	alg := token.Method.Alg()
	if alg == algHS256 {
		if v.hs256Secret == nil {
			return nil, errAlgorithmNotAccepted
		}

		return v.hs256Secret, nil
	}
	if v.jwks == nil {
		return nil, errAlgorithmNotAccepted
	}

	key, err := v.jwks.KeyfuncCtx(context.Background())(token)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errNoKey, err)
	}

	set, ok := key.(jwt.VerificationKeySet)
	if !ok {
		if !keyFitsAlgorithm(key, alg) {
			return nil, errNoKey
		}

		return key, nil
	}

	// A token without a kid header is checked against every key of its
	// algorithm.
	var matching jwt.VerificationKeySet
	for _, k := range set.Keys {
		if keyFitsAlgorithm(k, alg) {
			matching.Keys = append(matching.Keys, k)
		}
	}
	if len(matching.Keys) == 0 {
		return nil, errNoKey
	}

	return matching, nil
}

var (
	errAlgorithmNotAccepted = errors.New("signing algorithm not accepted")
	errNoKey                = errors.New("no key for the JWT")
)

// checkHeader rejects a JWT header with a crit parameter, because this
// package implements no JWS extension (RFC 7515 section 4.1.11). It also
// rejects a typ parameter other than JWT or at+jwt (RFC 9068). The typ
// comparison ignores case and an "application/" prefix (RFC 7515 section
// 4.1.9). A header without typ is accepted.
func checkHeader(header map[string]any) error {
	if _, ok := header["crit"]; ok {
		return rejectJWT("JWT has a crit header, which this server rejects because it implements no JWS extension")
	}

	typ, ok := header["typ"]
	if !ok {
		return nil
	}
	mediaType, isString := typ.(string)
	if !isString || !acceptedMediaType(mediaType) {
		return rejectJWT(`JWT typ header must be "JWT" or "at+jwt" when present`)
	}

	return nil
}

// acceptedMediaType reports whether typ is JWT or at+jwt, ignoring case
// and an "application/" prefix.
func acceptedMediaType(typ string) bool {
	const prefix = "application/"
	if len(typ) > len(prefix) && strings.EqualFold(typ[:len(prefix)], prefix) {
		typ = typ[len(prefix):]
	}

	return strings.EqualFold(typ, "JWT") || strings.EqualFold(typ, "at+jwt")
}

// keyFitsAlgorithm reports whether key is a public key of the type alg uses.
func keyFitsAlgorithm(key any, alg string) bool {
	switch k := key.(type) {
	case *rsa.PublicKey:
		return alg == algRS256 && k.N.BitLen() >= minRSABits
	case *ecdsa.PublicKey:
		return alg == algES256 && k.Curve == elliptic.P256()
	case ed25519.PublicKey:
		return alg == algEdDSA
	default:
		return false
	}
}

// rejectionMessage turns a jwt parse error into a client message. The
// message names the failed check and never contains the token.
func (v *jwtVerifier) rejectionMessage(err error) string {
	var invalid *invalidJWTError
	switch {
	case errors.As(err, &invalid):
		return invalid.message
	case errors.Is(err, jwt.ErrTokenMalformed):
		return "JWT is malformed"
	case errors.Is(err, errAlgorithmNotAccepted):
		return fmt.Sprintf("JWT signing algorithm is not accepted; accepted: %s", strings.Join(v.algorithms, ", "))
	case errors.Is(err, errNoKey):
		return "JWT has no matching key in the JWKS: check its kid and alg headers"
	case errors.Is(err, jwt.ErrTokenSignatureInvalid) && strings.Contains(err.Error(), "signing method"):
		// jwt v5.3.1 reports an alg outside WithValidMethods as an
		// invalid signature whose text names the signing method.
		return fmt.Sprintf("JWT signing algorithm is not accepted; accepted: %s", strings.Join(v.algorithms, ", "))
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return "JWT signature is invalid"
	case errors.Is(err, jwt.ErrTokenUnverifiable):
		return "JWT cannot be verified: its signing algorithm is missing or unknown"
	case errors.Is(err, jwt.ErrTokenExpired):
		return "JWT is expired"
	case errors.Is(err, jwt.ErrTokenNotValidYet):
		return "JWT is not valid yet: its nbf claim is in the future"
	case errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return "JWT is not valid yet: its iat claim is in the future"
	case errors.Is(err, jwt.ErrTokenInvalidIssuer):
		return "JWT iss claim is not the accepted issuer"
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return "JWT aud claim does not include the accepted audience"
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		return missingClaimMessage(err)
	case errors.Is(err, jwt.ErrInvalidType):
		return "JWT has a claim of the wrong type"
	default:
		return "JWT is invalid"
	}
}

// missingClaimMessage names the required claim that err reports missing.
// jwt v5.3.1 has one sentinel error for all of them and names the claim only
// in the text: "exp claim is required".
func missingClaimMessage(err error) string {
	for _, claim := range []string{"exp", "iss", "aud"} {
		if strings.Contains(err.Error(), claim+" claim is required") {
			return fmt.Sprintf("JWT has no %s claim; exp, iss and aud are required", claim)
		}
	}

	return "JWT is missing a required claim; exp, iss and aud are required"
}

// jwksKey identifies a key of a JWKS in log records: its index in the
// keys array and its kid, which may be empty.
type jwksKey struct {
	index int
	kid   string
}

// skippedKey is a JWKS key that parseJWKS did not load.
type skippedKey struct {
	jwksKey
	reason string
}

// parsedJWKS is the result of parseJWKS.
type parsedJWKS struct {
	// storage contains the public keys that verify JWTs.
	storage jwkset.Storage
	// skipped are the keys not loaded, with the reason.
	skipped []skippedKey
	// withPrivate are the keys, loaded or skipped, that contain private
	// key material. parseJWKS drops it.
	withPrivate []jwksKey
}

// parseJWKS loads the public signing keys of raw, a JWKS document, for
// RS256, ES256 and EdDSA. It skips encryption keys and keys of other
// algorithms, reporting them in skipped. Private key material ("d" and the
// RSA CRT parameters) is dropped and reported in withPrivate. It returns an
// error when raw is not a JWKS, has a symmetric or malformed key, has two
// loaded keys with the same non-empty kid, or has no usable key.
func parseJWKS(raw []byte) (parsedJWKS, error) {
	var set jwkset.JWKSMarshal
	if err := json.Unmarshal(raw, &set); err != nil {
		return parsedJWKS{}, fmt.Errorf("parse JWKS JSON: %w", err)
	}
	if len(set.Keys) == 0 {
		return parsedJWKS{}, errors.New(`JWKS has no keys: it must be {"keys": [...]}`)
	}

	parsed := parsedJWKS{storage: jwkset.NewMemoryStorage()}
	loadedKIDs := make(map[string]int) // kid to key index
	for i, m := range set.Keys {
		key := jwksKey{index: i, kid: m.KID}
		reason, err := checkJWK(m)
		if err != nil {
			return parsedJWKS{}, fmt.Errorf("JWKS key %d (kid %q): %w", i, m.KID, err)
		}
		if hasPrivateMaterial(m) {
			parsed.withPrivate = append(parsed.withPrivate, key)
		}
		if reason != "" {
			parsed.skipped = append(parsed.skipped, skippedKey{jwksKey: key, reason: reason})
			continue
		}

		jwk, err := jwkset.NewJWKFromMarshal(m, jwkset.JWKMarshalOptions{Private: false}, jwkset.JWKValidateOptions{})
		if err != nil {
			return parsedJWKS{}, fmt.Errorf("JWKS key %d (kid %q): %w", i, m.KID, err)
		}
		if !keyFitsAnyAlgorithm(jwk.Key()) {
			parsed.skipped = append(parsed.skipped, skippedKey{jwksKey: key, reason: fmt.Sprintf("RSA keys need at least %d bits", minRSABits)})
			continue
		}

		// A JWT names its key by kid, so two keys with one kid would make
		// the choice of key depend on their order in the file.
		if first, ok := loadedKIDs[m.KID]; ok && m.KID != "" {
			return parsedJWKS{}, fmt.Errorf("JWKS keys %d and %d share the kid %q; each signing key needs its own kid", first, i, m.KID)
		}
		loadedKIDs[m.KID] = i

		if err := parsed.storage.KeyWrite(context.Background(), jwk); err != nil {
			return parsedJWKS{}, fmt.Errorf("JWKS key %d (kid %q): %w", i, m.KID, err)
		}
	}

	keys, err := parsed.storage.KeyReadAll(context.Background())
	if err != nil {
		return parsedJWKS{}, fmt.Errorf("read JWKS keys: %w", err)
	}
	if len(keys) == 0 {
		return parsedJWKS{}, fmt.Errorf("JWKS has no RS256, ES256 or EdDSA signing key (%d keys skipped)", len(parsed.skipped))
	}

	return parsed, nil
}

// hasPrivateMaterial reports whether m contains private key parameters of
// an EC, OKP or RSA key (RFC 7518 section 6 and RFC 8037 section 2).
func hasPrivateMaterial(m jwkset.JWKMarshal) bool {
	return m.D != "" || m.P != "" || m.Q != "" || m.DP != "" || m.DQ != "" || m.QI != "" || len(m.OTH) > 0
}

// checkJWK returns an error for a key that must not be in a JWKS for
// verification, or a reason to skip a key that this package does not use,
// or neither.
func checkJWK(m jwkset.JWKMarshal) (skipReason string, err error) {
	if m.KTY == jwkset.KtyOct {
		return "", errors.New("symmetric keys (kty oct) are not accepted: set HS256Secret for HS256")
	}
	if m.USE == jwkset.UseEnc {
		return "encryption key (use enc)", nil
	}
	if m.ALG != "" && !slices.Contains([]jwkset.ALG{jwkset.AlgRS256, jwkset.AlgES256, jwkset.AlgEdDSA}, m.ALG) {
		return fmt.Sprintf("algorithm %s is not accepted", m.ALG), nil
	}

	switch {
	case m.KTY == jwkset.KtyRSA:
		return "", nil
	case m.KTY == jwkset.KtyEC && m.CRV == jwkset.CrvP256:
		return "", nil
	case m.KTY == jwkset.KtyOKP && m.CRV == jwkset.CrvEd25519:
		return "", nil
	default:
		return fmt.Sprintf("key type %s with curve %q is not accepted", m.KTY, m.CRV), nil
	}
}

// keyFitsAnyAlgorithm reports whether key can verify one of the accepted
// JWKS algorithms.
func keyFitsAnyAlgorithm(key any) bool {
	return keyFitsAlgorithm(key, algRS256) || keyFitsAlgorithm(key, algES256) || keyFitsAlgorithm(key, algEdDSA)
}

// DevClaims are the claims of a development JWT minted by MintDevJWT.
type DevClaims struct {
	// Subject is the user id (sub). Required.
	Subject string
	// AccountID is the user's account (ClaimAccountID). Required unless
	// PlatformAdmin is set.
	AccountID string
	// Role is RoleMember or RoleAdmin (ClaimRole). Required unless
	// PlatformAdmin is set.
	Role string
	// PlatformAdmin marks an operator (ClaimPlatformAdmin).
	PlatformAdmin bool
}

// MintDevJWT returns an HS256 JWT signed with secret, issued at now and
// expiring after ttl, for development and tests. A server whose
// Config.HS256Secret, Issuer and Audience match accepts it.
//
// It returns an error when secret is shorter than MinHS256SecretBytes, when
// issuer, audience or the subject is empty, when ttl is not positive, or
// when a user's account or role is missing or invalid.
func MintDevJWT(secret []byte, issuer, audience string, claims DevClaims, now time.Time, ttl time.Duration) (string, error) {
	var errs []error
	if len(secret) < MinHS256SecretBytes {
		errs = append(errs, fmt.Errorf("secret has %d bytes; it must have at least %d", len(secret), MinHS256SecretBytes))
	}
	if issuer == "" {
		errs = append(errs, errors.New("issuer is required"))
	}
	if audience == "" {
		errs = append(errs, errors.New("audience is required"))
	}
	if claims.Subject == "" {
		errs = append(errs, errors.New("subject is required"))
	}
	if ttl <= 0 {
		errs = append(errs, fmt.Errorf("ttl is %s; it must be positive", ttl))
	}
	if !claims.PlatformAdmin && claims.AccountID == "" {
		errs = append(errs, errors.New("account id is required for a user"))
	}
	if !claims.PlatformAdmin && claims.Role != RoleMember && claims.Role != RoleAdmin {
		errs = append(errs, fmt.Errorf("role is %q; it must be %q or %q for a user", claims.Role, RoleMember, RoleAdmin))
	}
	if err := errors.Join(errs...); err != nil {
		return "", fmt.Errorf("mint development JWT: %w", err)
	}

	token := jwt.NewWithClaims(jwt.SigningMethodHS256, jwtClaims{
		RegisteredClaims: jwt.RegisteredClaims{
			Subject:   claims.Subject,
			Issuer:    issuer,
			Audience:  jwt.ClaimStrings{audience},
			IssuedAt:  jwt.NewNumericDate(now),
			NotBefore: jwt.NewNumericDate(now),
			ExpiresAt: jwt.NewNumericDate(now.Add(ttl)),
		},
		AccountID:     claims.AccountID,
		Role:          claims.Role,
		PlatformAdmin: claims.PlatformAdmin,
	})

	signed, err := token.SignedString(secret)
	if err != nil {
		return "", fmt.Errorf("sign development JWT: %w", err)
	}

	return signed, nil
}
