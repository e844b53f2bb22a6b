package graphsim

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap"
)

// Token audiences and lifetimes.
const (
	// GraphResource is the aud of the access tokens the simulator issues.
	GraphResource = "https://graph.microsoft.com"
	// graphAppID is Microsoft Graph's first-party app id, the other accepted form of the
	// audience.
	graphAppID = "00000003-0000-0000-c000-000000000000"
	// PlatformAppID is the appid claim of callback tokens: the calling platform signs them on
	// behalf of Microsoft Graph.
	PlatformAppID       = graphAppID
	accessTokenLifetime = 3599 * time.Second
	callbackLifetime    = 5 * time.Minute
)

// roles are the application permissions granted in the simulator's access tokens.
var roles = []string{
	"Calls.AccessMedia.All", "Calls.Initiate.All", "Calls.InitiateGroupCall.All",
	"Calls.JoinGroupCall.All", "Presence.Read.All",
}

func newSigningKey() (*rsa.PrivateKey, string, error) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, "", fmt.Errorf("graphsim: signing key: %w", err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return nil, "", fmt.Errorf("graphsim: signing key: %w", err)
	}
	sum := sha256.Sum256(der)
	return key, base64.RawURLEncoding.EncodeToString(sum[:15]), nil
}

type jwk struct {
	Kty string `json:"kty"`
	Use string `json:"use"`
	Alg string `json:"alg"`
	Kid string `json:"kid"`
	N   string `json:"n"`
	E   string `json:"e"`
}

func jwkOf(kid string, pub *rsa.PublicKey) jwk {
	return jwk{
		Kty: "RSA", Use: "sig", Alg: "RS256", Kid: kid,
		N: base64.RawURLEncoding.EncodeToString(pub.N.Bytes()),
		E: base64.RawURLEncoding.EncodeToString(big.NewInt(int64(pub.E)).Bytes()),
	}
}

func jwks(kid string, pub *rsa.PublicKey) map[string][]jwk {
	return map[string][]jwk{"keys": {jwkOf(kid, pub)}}
}

// signingKey is one key that signs callback tokens.
type signingKey struct {
	key *rsa.PrivateKey
	kid string
}

func newCallbackKey() (*signingKey, error) {
	k, kid, err := newSigningKey()
	if err != nil {
		return nil, err
	}
	return &signingKey{key: k, kid: kid}, nil
}

// pendingKey returns the key the next rollover publishes, creating it when needed (outside
// s.mu: RSA key generation takes a while).
func (s *Sim) pendingKey() (*signingKey, error) {
	s.mu.Lock()
	p := s.pending
	s.mu.Unlock()
	if p != nil {
		return p, nil
	}
	p, err := newCallbackKey()
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pending == nil {
		s.pending = p
	}
	return s.pending, nil
}

// RolloverKey rolls the callback signing key over, as the calling platform does from time to
// time: /botauth/keys publishes a new key (and, for tokens already in flight, the key it
// replaces), and notifications are signed with the new key from now on. A bot that cached the
// old key set sees an unknown kid and must fetch the keys again. It returns the new key id.
func (s *Sim) RolloverKey() (string, error) {
	p, err := s.pendingKey()
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pending == p {
		s.pending = nil
	}
	s.published = []*signingKey{p, s.signing}
	s.signing = p
	s.injectLog = append(s.injectLog, InjectedFault{Time: time.Now(), Kind: FaultRollover, Kid: p.kid})
	s.log.Info("callback signing key rolled over", zap.String("kid", p.kid))
	return p.kid, nil
}

// CallbackKeyID is the kid of the key notifications are signed with now.
func (s *Sim) CallbackKeyID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.signing.kid
}

func sign(key *rsa.PrivateKey, kid string, claims map[string]any) (string, error) {
	t := jwt.NewWithClaims(jwt.SigningMethodRS256, jwt.MapClaims(claims))
	t.Header["kid"] = kid
	return t.SignedString(key)
}

// callbackClaims are the claims of a callback token minted now.
func (s *Sim) callbackClaims(now time.Time) map[string]any {
	return map[string]any{
		"aud":   s.opts.ClientID,
		"iss":   s.opts.Issuer,
		"iat":   now.Unix(),
		"nbf":   now.Unix(),
		"exp":   now.Add(callbackLifetime).Unix(),
		"tid":   s.opts.TenantID,
		"appid": PlatformAppID,
	}
}

// SignToken signs a token with the callback key (the one /botauth/keys publishes), as the
// simulator does for notifications. claims override the defaults the simulator would use
// (aud = ClientID, iss = Issuer, iat, nbf, exp = now+5m, tid, appid); a nil value removes a
// claim. Tests use it to forge variations: wrong audience, expired, no tid...
func (s *Sim) SignToken(claims map[string]any) (string, error) {
	c := s.callbackClaims(time.Now())
	for k, v := range claims {
		if v == nil {
			delete(c, k)
			continue
		}
		c[k] = v
	}
	s.mu.Lock()
	k := s.signing
	s.mu.Unlock()
	return sign(k.key, k.kid, c)
}

// callbackToken signs the bearer token of one notification; fault FaultExpiredToken or
// FaultUnpublishedKey spoils it.
func (s *Sim) callbackToken(fault FaultKind) (string, error) {
	now := time.Now()
	s.mu.Lock()
	k := s.signing
	s.mu.Unlock()
	switch fault {
	case FaultExpiredToken:
		now = now.Add(-callbackLifetime - 10*time.Minute)
	case FaultUnpublishedKey:
		p, err := s.pendingKey()
		if err != nil {
			return "", err
		}
		k = p
	default:
		// Tokens minted in the same second are identical (claims have second resolution): sign
		// once a second, as an RS256 signature costs ~1 ms and would otherwise cap a load run.
		sec := now.Unix()
		s.mu.Lock()
		if s.tokCache.kid == k.kid && s.tokCache.sec == sec {
			tok := s.tokCache.tok
			s.mu.Unlock()
			return tok, nil
		}
		s.mu.Unlock()
		tok, err := sign(k.key, k.kid, s.callbackClaims(now))
		if err == nil {
			s.mu.Lock()
			s.tokCache.kid, s.tokCache.sec, s.tokCache.tok = k.kid, sec, tok
			s.mu.Unlock()
		}
		return tok, err
	}
	return sign(k.key, k.kid, s.callbackClaims(now))
}

// issueAccessToken mints an app-only Graph token that expires at exp.
func (s *Sim) issueAccessToken(now, exp time.Time) (string, error) {
	return sign(s.tokenKey, s.tokenKid, map[string]any{
		"aud":   GraphResource,
		"iss":   s.tokenIssuer(),
		"iat":   now.Unix(),
		"nbf":   now.Unix(),
		"exp":   exp.Unix(),
		"tid":   s.opts.TenantID,
		"appid": s.opts.ClientID,
		"azp":   s.opts.ClientID,
		"oid":   servicePrincipalID(s.opts.ClientID),
		"sub":   servicePrincipalID(s.opts.ClientID),
		"idtyp": "app",
		"roles": roles,
		"ver":   "1.0",
		"jti":   newID(),
	})
}

func (s *Sim) tokenIssuer() string { return s.url + "/" + s.opts.TenantID + "/v2.0" }

// servicePrincipalID is a stable made-up object id for the app's service principal.
func servicePrincipalID(clientID string) string {
	sum := sha256.Sum256([]byte("sp:" + clientID))
	id, _ := uuidFromBytes(sum[:16])
	return id
}

func uuidFromBytes(b []byte) (string, error) {
	if len(b) != 16 {
		return "", errors.New("need 16 bytes")
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}

var errNoBearer = errors.New("access token is empty")

// authorize checks the bearer token of a Graph request: signed by the simulator's token key,
// not expired, for Graph, in the configured tenant, for the configured app.
func (s *Sim) authorize(r *http.Request) error {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	tok = strings.TrimSpace(tok)
	if !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" {
		return errNoBearer
	}
	var claims struct {
		jwt.RegisteredClaims
		TID   string `json:"tid"`
		AppID string `json:"appid"`
	}
	p := jwt.NewParser(jwt.WithValidMethods([]string{"RS256"}), jwt.WithExpirationRequired(), jwt.WithIssuedAt())
	_, err := p.ParseWithClaims(tok, &claims, func(t *jwt.Token) (any, error) {
		if kid, _ := t.Header["kid"].(string); kid != s.tokenKid {
			return nil, fmt.Errorf("unknown signing key %q", kid)
		}
		return &s.tokenKey.PublicKey, nil
	})
	switch {
	case err != nil:
		return err
	case !slices.ContainsFunc(claims.Audience, func(a string) bool {
		return strings.EqualFold(strings.TrimRight(a, "/"), GraphResource) || strings.EqualFold(a, graphAppID)
	}):
		return fmt.Errorf("audience %v is not Microsoft Graph", claims.Audience)
	case !strings.EqualFold(claims.TID, s.opts.TenantID):
		return fmt.Errorf("tenant %q is not %q", claims.TID, s.opts.TenantID)
	case claims.AppID != s.opts.ClientID:
		return fmt.Errorf("appid %q is not the registered client", claims.AppID)
	}
	return nil
}

// handleOpenIDConfig serves the Entra ID tenant metadata MSAL reads before requesting a token.
// MSAL needs authorization_endpoint, token_endpoint and an issuer on the authority's host.
func (s *Sim) handleOpenIDConfig(w http.ResponseWriter, r *http.Request) {
	info := reqInfoFrom(r)
	info.action = "openid-configuration"
	tenant := r.PathValue("tenant")
	if !strings.EqualFold(tenant, s.opts.TenantID) {
		s.aadError(w, r, http.StatusBadRequest, "invalid_tenant", 90002,
			fmt.Sprintf("Tenant '%s' not found. Check to make sure you have the correct tenant ID.", tenant))
		return
	}
	t := s.url + "/" + s.opts.TenantID
	writeJSON(w, http.StatusOK, map[string]any{
		"token_endpoint":                        t + "/oauth2/v2.0/token",
		"token_endpoint_auth_methods_supported": []string{"client_secret_post", "private_key_jwt", "client_secret_basic"},
		"jwks_uri":                              t + "/discovery/v2.0/keys",
		"response_modes_supported":              []string{"query", "fragment", "form_post"},
		"subject_types_supported":               []string{"pairwise"},
		"id_token_signing_alg_values_supported": []string{"RS256"},
		"response_types_supported":              []string{"code", "id_token", "code id_token", "id_token token"},
		"scopes_supported":                      []string{"openid", "profile", "email", "offline_access"},
		"issuer":                                s.tokenIssuer(),
		"request_uri_parameter_supported":       false,
		"userinfo_endpoint":                     s.url + "/oidc/userinfo",
		"authorization_endpoint":                t + "/oauth2/v2.0/authorize",
		"device_authorization_endpoint":         t + "/oauth2/v2.0/devicecode",
		"http_logout_supported":                 true,
		"frontchannel_logout_supported":         true,
		"end_session_endpoint":                  t + "/oauth2/v2.0/logout",
		"claims_supported":                      []string{"sub", "iss", "aud", "exp", "iat", "nbf", "tid", "oid", "roles"},
		"tenant_region_scope":                   "EU",
		"cloud_instance_name":                   "microsoftonline.com",
		"cloud_graph_host_name":                 "graph.windows.net",
		"msgraph_host":                          "graph.microsoft.com",
	})
}

func (s *Sim) handleTokenKeys(w http.ResponseWriter, r *http.Request) {
	reqInfoFrom(r).action = "token-keys"
	writeJSON(w, http.StatusOK, jwks(s.tokenKid, &s.tokenKey.PublicKey))
}

// handleToken implements the client-credentials grant
// (https://learn.microsoft.com/en-us/graph/auth-v2-service).
func (s *Sim) handleToken(w http.ResponseWriter, r *http.Request) {
	info := reqInfoFrom(r)
	info.action = "token"
	s.mu.Lock()
	s.tokenRequests++
	s.mu.Unlock()
	if err := r.ParseForm(); err != nil {
		s.aadError(w, r, http.StatusBadRequest, "invalid_request", 900144, "The request body must be application/x-www-form-urlencoded.")
		return
	}
	tenant := r.PathValue("tenant")
	if !strings.EqualFold(tenant, s.opts.TenantID) {
		s.aadError(w, r, http.StatusBadRequest, "invalid_request", 90002, fmt.Sprintf("Tenant '%s' not found.", tenant))
		return
	}
	if gt := r.PostForm.Get("grant_type"); gt != "client_credentials" {
		s.aadError(w, r, http.StatusBadRequest, "unsupported_grant_type", 70003,
			fmt.Sprintf("The app requested an unsupported grant type '%s'.", gt))
		return
	}
	clientID, secret := r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	if u, p, ok := r.BasicAuth(); ok && secret == "" {
		clientID, secret = u, p
	}
	switch {
	case clientID != s.opts.ClientID:
		s.aadError(w, r, http.StatusUnauthorized, "invalid_client", 700016,
			fmt.Sprintf("Application with identifier '%s' was not found in the directory '%s'.", clientID, s.opts.TenantID))
		return
	case secret != s.opts.ClientSecret:
		s.aadError(w, r, http.StatusUnauthorized, "invalid_client", 7000215,
			"Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.")
		return
	}
	if !slices.Contains(strings.Fields(r.PostForm.Get("scope")), GraphResource+"/.default") {
		s.aadError(w, r, http.StatusBadRequest, "invalid_scope", 1002012,
			fmt.Sprintf("The provided value for scope %s is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.", r.PostForm.Get("scope")))
		return
	}
	// Faults apply to requests that authenticated (docs/graphsim.md): a bad secret never uses one.
	if s.requestFault(w, r, "token", true) {
		return
	}
	now := time.Now()
	tok, err := s.issueAccessToken(now, now.Add(accessTokenLifetime))
	if err != nil {
		s.aadError(w, r, http.StatusInternalServerError, "server_error", 500000, err.Error())
		return
	}
	w.Header().Set("Cache-Control", "no-store, no-cache")
	writeJSON(w, http.StatusOK, map[string]any{
		"token_type":     "Bearer",
		"expires_in":     int(accessTokenLifetime / time.Second),
		"ext_expires_in": int(accessTokenLifetime / time.Second),
		"access_token":   tok,
	})
}

// aadError writes an Entra ID (OAuth) error body.
func (s *Sim) aadError(w http.ResponseWriter, r *http.Request, status int, code string, aadsts int, msg string) {
	info := reqInfoFrom(r)
	writeJSON(w, status, map[string]any{
		"error":             code,
		"error_description": fmt.Sprintf("AADSTS%d: %s Trace ID: %s Correlation ID: %s Timestamp: %s", aadsts, msg, info.requestID, info.clientRequestID, time.Now().UTC().Format("2006-01-02 15:04:05Z")),
		"error_codes":       []int{aadsts},
		"timestamp":         time.Now().UTC().Format("2006-01-02 15:04:05Z"),
		"trace_id":          info.requestID,
		"correlation_id":    info.clientRequestID,
	})
}

func (s *Sim) handleBotAuthConfig(w http.ResponseWriter, r *http.Request) {
	reqInfoFrom(r).action = "botauth-openid-configuration"
	if s.requestFault(w, r, "botauth-openid-configuration", false) {
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"issuer":                                s.opts.Issuer,
		"jwks_uri":                              s.url + "/botauth/keys",
		"id_token_signing_alg_values_supported": []string{"RS256"},
		"token_endpoint_auth_methods_supported": []string{"private_key_jwt"},
	})
}

func (s *Sim) handleBotAuthKeys(w http.ResponseWriter, r *http.Request) {
	reqInfoFrom(r).action = "botauth-keys"
	if s.requestFault(w, r, "botauth-keys", false) {
		return
	}
	s.mu.Lock()
	keys := make([]jwk, len(s.published))
	for i, k := range s.published {
		keys[i] = jwkOf(k.kid, &k.key.PublicKey)
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string][]jwk{"keys": keys})
}
