package graph

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Claims are what a verified callback token tells callbot.
type Claims struct {
	TenantID string
	AppID    string
	Issuer   string
	Expiry   time.Time
}

// VerifierConfig configures inbound token validation: a bearer token signed with a key of the
// OpenID configuration at api.aps.skype.com, aud the bot's app id, iss https://api.botframework.com,
// tid the tenant, not expired ("Authenticate the callback",
// https://learn.microsoft.com/en-us/microsoftteams/platform/bots/calls-and-meetings/call-notifications).
// Microsoft's calling samples (AuthenticationProvider.cs in microsoft-graph-comms-samples, which
// that page links to) also accept the issuer https://graph.microsoft.com.
type VerifierConfig struct {
	// OpenIDConfigURL is the metadata document naming jwks_uri, by default
	// https://api.aps.skype.com/v1/.well-known/OpenIdConfiguration.
	OpenIDConfigURL string
	// Audience is the bot's app (client) id.
	Audience string
	// Issuers accepted; compared exactly (a trailing slash counts). Default:
	// https://graph.microsoft.com and https://api.botframework.com.
	Issuers []string
	// AllowedTenants, when not empty, is the list of tid values accepted.
	AllowedTenants []string
	// Leeway is the clock skew allowed on exp and nbf; default 2 minutes.
	Leeway time.Duration
	// RefreshEvery is how often keys are refreshed; default 24h. An unknown kid triggers a
	// refresh: a burst of refreshBurst, then one per MinRefreshGap (default 10 s), so a genuine
	// rollover is followed at once while forged kids cannot make callbot hammer the metadata URL.
	// A token whose kid is unknown when no refresh is allowed gets ErrUnavailable (503, so Graph
	// sends it again), not a rejection, since keys roll over without notice.
	RefreshEvery  time.Duration
	MinRefreshGap time.Duration
	HTTPClient    *http.Client
	Now           func() time.Time
}

// DefaultIssuers are the issuers the official samples accept on calling callbacks.
var DefaultIssuers = []string{"https://graph.microsoft.com", "https://api.botframework.com"}

// DefaultOpenIDConfigURL is the metadata the calling platform's tokens are signed under.
const DefaultOpenIDConfigURL = "https://api.aps.skype.com/v1/.well-known/OpenIdConfiguration"

// Token validation failures. Every error Verify returns wraps ErrUnauthorized, except a token
// signed with a key callbot cannot look up yet (just rolled over, or the metadata is down),
// which wraps ErrUnavailable: the request should be sent again.
var (
	ErrUnauthorized = errors.New("unauthorized")
	ErrNoToken      = fmt.Errorf("%w: no bearer token", ErrUnauthorized)
	errKeyNotYet    = errors.New("signing key not known yet")
)

// Verifier validates the bearer tokens Graph puts on webhook requests. It caches the signing
// keys and the tokens it has verified (until they expire), so the RSA check is paid once per
// token, not once per request. Safe for concurrent use.
type Verifier struct {
	cfg    VerifierConfig
	parser *jwt.Parser

	mu        sync.Mutex
	keys      map[string][]*rsa.PublicKey // by kid: more than one where the set has several under it
	fetchedAt time.Time
	fetching  chan struct{} // closed when the fetch in flight ends
	lastErr   error         // the outcome of the last fetch, nil when it succeeded
	// refreshes allowed now (up to refreshBurst), refilled one per MinRefreshGap since refilled
	allowance float64
	refilled  time.Time

	cacheMu sync.RWMutex
	cache   map[string]Claims
}

// NewVerifier returns a verifier; it fetches keys on Prefetch or on first use.
func NewVerifier(cfg VerifierConfig) (*Verifier, error) {
	if cfg.Audience == "" {
		return nil, errors.New("token verifier: audience (client id) is required")
	}
	if cfg.OpenIDConfigURL == "" {
		cfg.OpenIDConfigURL = DefaultOpenIDConfigURL
	}
	if len(cfg.Issuers) == 0 {
		cfg.Issuers = DefaultIssuers
	}
	if cfg.Leeway == 0 {
		cfg.Leeway = 2 * time.Minute
	}
	if cfg.RefreshEvery == 0 {
		cfg.RefreshEvery = 24 * time.Hour
	}
	if cfg.MinRefreshGap == 0 {
		cfg.MinRefreshGap = 10 * time.Second
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: 10 * time.Second}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	v := &Verifier{cfg: cfg, cache: map[string]Claims{}, allowance: refreshBurst}
	v.parser = jwt.NewParser(
		jwt.WithValidMethods([]string{"RS256"}),
		jwt.WithAudience(cfg.Audience),
		jwt.WithExpirationRequired(),
		jwt.WithLeeway(cfg.Leeway),
		jwt.WithTimeFunc(cfg.Now),
	)
	return v, nil
}

// VerifyRequest reads the Authorization header and verifies its bearer token.
func (v *Verifier) VerifyRequest(r *http.Request) (Claims, error) {
	h := r.Header.Get("Authorization")
	scheme, tok, ok := strings.Cut(h, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(tok) == "" {
		return Claims{}, ErrNoToken
	}
	return v.Verify(r.Context(), strings.TrimSpace(tok))
}

// Verify checks signature (RS256 against the published keys), audience, issuer, lifetime and
// tenant. Errors wrap ErrUnauthorized.
func (v *Verifier) Verify(ctx context.Context, token string) (Claims, error) {
	now := v.cfg.Now()
	v.cacheMu.RLock()
	c, ok := v.cache[token]
	v.cacheMu.RUnlock()
	if ok && now.Before(c.Expiry.Add(v.cfg.Leeway)) {
		return c, nil
	}

	var claims struct {
		jwt.RegisteredClaims
		TID   string `json:"tid"`
		AppID string `json:"appid"`
	}
	_, err := v.parser.ParseWithClaims(token, &claims, func(t *jwt.Token) (any, error) {
		kid, _ := t.Header["kid"].(string)
		ks, err := v.key(ctx, kid)
		if err != nil {
			return nil, err
		}
		if len(ks) == 1 {
			return ks[0], nil
		}
		set := jwt.VerificationKeySet{Keys: make([]jwt.VerificationKey, len(ks))}
		for i, k := range ks {
			set.Keys[i] = k
		}
		return set, nil // verified if any of them signed it
	})
	if errors.Is(err, errKeyNotYet) {
		return Claims{}, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	if err != nil {
		return Claims{}, fmt.Errorf("%w: %v", ErrUnauthorized, err)
	}
	if !slices.Contains(v.cfg.Issuers, claims.Issuer) {
		return Claims{}, fmt.Errorf("%w: issuer %q not accepted", ErrUnauthorized, claims.Issuer)
	}
	if claims.TID == "" {
		return Claims{}, fmt.Errorf("%w: token has no tid claim", ErrUnauthorized)
	}
	if len(v.cfg.AllowedTenants) > 0 && !slices.Contains(v.cfg.AllowedTenants, claims.TID) {
		return Claims{}, fmt.Errorf("%w: tenant %s not allowed", ErrUnauthorized, claims.TID)
	}
	c = Claims{TenantID: claims.TID, AppID: claims.AppID, Issuer: claims.Issuer, Expiry: claims.ExpiresAt.Time}
	v.cacheMu.Lock()
	if len(v.cache) > 10000 { // bound memory: expired entries are swept when the cache grows
		for k, e := range v.cache {
			if now.After(e.Expiry.Add(v.cfg.Leeway)) {
				delete(v.cache, k)
			}
		}
	}
	v.cache[token] = c
	v.cacheMu.Unlock()
	return c, nil
}

// key returns the keys for kid (one, or the several a set holds under it), refreshing the key set when it is stale or the kid is unknown,
// at most once per MinRefreshGap so forged kids cannot make callbot hammer the metadata URL.
// Concurrent callers share one fetch, which runs on its own context (refreshKeys): a caller
// that gives up waiting does not cancel it for the others. A failed refresh keeps the keys already held. A known
// key is returned at once even when the set is stale: the refresh then runs in the background,
// so no notification waits for the metadata URL once a day.
func (v *Verifier) key(ctx context.Context, kid string) ([]*rsa.PublicKey, error) {
	v.mu.Lock()
	k, known := v.keys[kid]
	now := v.cfg.Now()
	if known {
		if now.Sub(v.fetchedAt) > v.cfg.RefreshEvery && v.fetching == nil && v.mayRefresh(now) {
			done := make(chan struct{})
			v.fetching = done // taken at once, so no second refresh starts
			go v.refreshKeys(done)
		}
		v.mu.Unlock()
		return k, nil
	}
	var fetchErr error
	fetched := false // this call fetched, or waited for a fetch that began after the token came
	for !fetched {
		wait, own := v.fetching, false
		if wait == nil && v.mayRefresh(now) {
			// The fetch serves every token that waits for it: it runs on its own context, so
			// that the request that started it cannot cancel it by hanging up.
			wait, own = make(chan struct{}), true
			v.fetching = wait
			go v.refreshKeys(wait)
		}
		if wait == nil {
			break
		}
		v.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done(): // the request gave up waiting: not the token's fault
			return nil, fmt.Errorf("%w: waiting for the key fetch: %v", errKeyNotYet, ctx.Err())
		}
		v.mu.Lock()
		fetchErr = v.lastErr // the key may be unknown only because that fetch failed
		if _, known = v.keys[kid]; known || fetchErr != nil {
			break
		}
		// A fetch in flight when the token came began before it, and may have read the key set
		// before a rollover: only one begun for it says the kid is unknown (else 503 below).
		fetched = own
	}
	k, known = v.keys[kid]
	v.mu.Unlock()
	switch {
	case known:
		return k, nil
	case fetchErr != nil:
		return nil, fmt.Errorf("%w: fetch signing keys: %v", errKeyNotYet, fetchErr)
	case !fetched:
		// no refresh allowed now: the key may have rolled over since the last one
		return nil, fmt.Errorf("%w: %q (key refreshes are rate-limited)", errKeyNotYet, kid)
	}
	return nil, fmt.Errorf("unknown signing key %q", kid)
}

// fetchLocked fetches the key set as the one fetch in flight, announced by done (v.fetching,
// closed at the end); v.mu is held on entry and on return, released while fetching. A failure
// keeps the keys held.
func (v *Verifier) fetchLocked(ctx context.Context, done chan struct{}) error {
	v.fetching = done
	v.mu.Unlock()
	keys, err := v.fetchKeys(ctx)
	v.mu.Lock()
	if err == nil {
		v.keys, v.fetchedAt = keys, v.cfg.Now()
	}
	v.lastErr = err
	v.fetching = nil
	close(done)
	return err
}

// refreshKeys fetches the key set in the background. A failure keeps the keys held; the next
// token after MinRefreshGap tries again.
func (v *Verifier) refreshKeys(done chan struct{}) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	v.mu.Lock()
	defer v.mu.Unlock()
	v.fetchLocked(ctx, done)
}

// Prefetch fetches the signing keys unless some are held, so that the first notifications after
// a start do not wait for the metadata URL. A fetch already in flight is waited for, not
// repeated. It returns the fetch's error; the caller retries (callbot: with backoff, from start).
// It does not take from the allowance that rate-limits refreshes for unknown kids.
func (v *Verifier) Prefetch(ctx context.Context) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	for v.keys == nil {
		if wait := v.fetching; wait != nil {
			v.mu.Unlock()
			select {
			case <-wait:
			case <-ctx.Done():
				v.mu.Lock()
				return ctx.Err()
			}
			v.mu.Lock()
			if v.keys == nil && v.lastErr != nil {
				return v.lastErr
			}
			continue
		}
		return v.fetchLocked(ctx, make(chan struct{}))
	}
	return nil
}

// Ready is nil once signing keys are held: until then no token can be verified, and
// notifications get 503 (so Graph sends them again). It names the last fetch's error.
func (v *Verifier) Ready() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	switch {
	case v.keys != nil:
		return nil
	case v.lastErr != nil:
		return fmt.Errorf("signing keys not fetched yet: %v", v.lastErr)
	}
	return errors.New("signing keys not fetched yet")
}

// refreshBurst is how many key refreshes may follow one another before the MinRefreshGap rate
// applies.
const refreshBurst = 3

// mayRefresh takes one refresh from the allowance; v.mu is held.
func (v *Verifier) mayRefresh(now time.Time) bool {
	if !v.refilled.IsZero() {
		v.allowance = min(refreshBurst, v.allowance+float64(now.Sub(v.refilled))/float64(v.cfg.MinRefreshGap))
	}
	v.refilled = now
	if v.allowance < 1 {
		return false
	}
	v.allowance--
	return true
}

func (v *Verifier) getJSON(ctx context.Context, url string, into any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := v.cfg.HTTPClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: status %d", url, resp.StatusCode)
	}
	return json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(into)
}

func (v *Verifier) fetchKeys(ctx context.Context) (map[string][]*rsa.PublicKey, error) {
	var meta struct {
		JWKSURI string `json:"jwks_uri"`
	}
	if err := v.getJSON(ctx, v.cfg.OpenIDConfigURL, &meta); err != nil {
		return nil, err
	}
	if meta.JWKSURI == "" {
		return nil, errors.New("openid configuration has no jwks_uri")
	}
	// Each key is decoded on its own: one entry with a field of an unexpected type (an x5c that
	// is no array, a numeric kid) is left out, not taken for a broken set, which would leave
	// every good key of it unused.
	var set struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := v.getJSON(ctx, meta.JWKSURI, &set); err != nil {
		return nil, err
	}
	keys := map[string][]*rsa.PublicKey{}
	for _, raw := range set.Keys {
		var k struct {
			Kty string   `json:"kty"`
			Kid string   `json:"kid"`
			N   string   `json:"n"`
			E   string   `json:"e"`
			X5c []string `json:"x5c"`
		}
		if json.Unmarshal(raw, &k) != nil || k.Kty != "RSA" {
			continue
		}
		key := jwkKey(k.N, k.E, k.X5c)
		if key == nil || slices.ContainsFunc(keys[k.Kid], func(h *rsa.PublicKey) bool { return h.Equal(key) }) {
			continue
		}
		// Two keys under one kid (RFC 7517 says they SHOULD differ, not MUST) are both kept:
		// a token verifies if either signed it.
		keys[k.Kid] = append(keys[k.Kid], key)
	}
	if len(keys) == 0 {
		return nil, errors.New("jwks has no usable RSA key")
	}
	return keys, nil
}

// jwkKey is the RSA public key of a JWK: its modulus and exponent (n, e), or, where it has none
// or they do not decode to a key that can verify, its certificate (x5c, the first of the chain:
// standard base64 of the DER). Microsoft's sets carry both; a key with neither usable is nil
// (left out).
func jwkKey(n64, e64 string, x5c []string) *rsa.PublicKey {
	n, err1 := base64.RawURLEncoding.DecodeString(strings.TrimRight(n64, "="))
	e, err2 := base64.RawURLEncoding.DecodeString(strings.TrimRight(e64, "="))
	if err1 == nil && err2 == nil && len(n) > 0 && len(e) > 0 && len(e) <= 4 {
		if k := (&rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}); canVerify(k) {
			return k
		}
	}
	if len(x5c) == 0 {
		return nil
	}
	der, err := base64.StdEncoding.DecodeString(x5c[0])
	if err != nil {
		return nil
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil
	}
	key, _ := cert.PublicKey.(*rsa.PublicKey)
	if key == nil || !canVerify(key) {
		return nil
	}
	return key
}

// canVerify reports whether crypto/rsa verifies signatures with k at all: a modulus of 1024 bits
// or more, an odd exponent from 3 to 2^31-1. A key it refuses (a modulus cut short, an exponent
// of 1) was taken as usable: a set of such keys made callbot ready, and every token was refused
// as unauthorized (401, which Graph does not deliver again) instead of unavailable (503).
func canVerify(k *rsa.PublicKey) bool {
	return k.N.BitLen() >= 1024 && k.E >= 3 && k.E%2 == 1 && k.E <= 1<<31-1
}
