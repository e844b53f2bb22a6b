package graph

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap/zaptest"
)

const (
	testAudience = "0efc74f7-41c3-47a4-8775-7259bfef4241"
	testTenant   = "1fdd12d0-4620-44ed-baec-459b611f84b2"
)

// keyServer publishes an OpenID configuration and a JWKS, and counts fetches.
type keyServer struct {
	srv     *httptest.Server
	keys    map[string]*rsa.PrivateKey
	fetches atomic.Int32
	down    atomic.Bool
	gate    atomic.Pointer[chan struct{}] // when set, the metadata URL answers once it is closed
	certs   atomic.Bool                   // publish each key as a certificate only (x5c), no n and e
}

func newKeyServer(t testing.TB) *keyServer {
	ks := &keyServer{keys: map[string]*rsa.PrivateKey{"k1": genKey(t)}}
	mux := http.NewServeMux()
	mux.HandleFunc("/openid", func(w http.ResponseWriter, r *http.Request) {
		ks.fetches.Add(1)
		if g := ks.gate.Load(); g != nil {
			<-*g
		}
		if ks.down.Load() {
			http.Error(w, "down", 500)
			return
		}
		json.NewEncoder(w).Encode(map[string]string{"issuer": "https://api.botframework.com", "jwks_uri": ks.srv.URL + "/keys"})
	})
	mux.HandleFunc("/keys", func(w http.ResponseWriter, r *http.Request) {
		var set struct {
			Keys []map[string]any `json:"keys"`
		}
		for kid, k := range ks.keys {
			if ks.certs.Load() {
				set.Keys = append(set.Keys, map[string]any{"kty": "RSA", "kid": kid, "use": "sig", "x5c": []string{selfSigned(t, k)}})
				continue
			}
			set.Keys = append(set.Keys, map[string]any{"kty": "RSA", "kid": kid, "use": "sig",
				"n": base64.RawURLEncoding.EncodeToString(k.N.Bytes()),
				"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(k.E)).Bytes())})
		}
		json.NewEncoder(w).Encode(set)
	})
	ks.srv = httptest.NewServer(mux)
	t.Cleanup(ks.srv.Close)
	return ks
}

// fetchedSince waits (10 s at most, a bound for a failing test) until the metadata URL has been
// asked more than base times.
func (ks *keyServer) fetchedSince(base int32) bool {
	for deadline := time.Now().Add(10 * time.Second); ks.fetches.Load() == base; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}

// selfSigned is a certificate of k's public key, as a JWKS's x5c carries it (standard base64 DER).
func selfSigned(t testing.TB, k *rsa.PrivateKey) string {
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test signing key"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Error(err)
	}
	return base64.StdEncoding.EncodeToString(der)
}

func genKey(t testing.TB) *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func goodClaims(now time.Time) jwt.MapClaims {
	return jwt.MapClaims{"aud": testAudience, "iss": "https://api.botframework.com", "tid": testTenant,
		"iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(5 * time.Minute).Unix()}
}

func signRS(t testing.TB, key *rsa.PrivateKey, kid string, claims jwt.MapClaims) string {
	tok := jwt.NewWithClaims(jwt.SigningMethodRS256, claims)
	tok.Header["kid"] = kid
	tok.Header["cty"] = "JWT" // real Graph tokens carry it; it must not matter
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func newTestVerifier(t *testing.T, ks *keyServer, mod func(*VerifierConfig)) *Verifier {
	cfg := VerifierConfig{OpenIDConfigURL: ks.srv.URL + "/openid", Audience: testAudience, AllowedTenants: []string{testTenant}}
	if mod != nil {
		mod(&cfg)
	}
	v, err := NewVerifier(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestVerifierRejections(t *testing.T) {
	ks := newKeyServer(t)
	now := time.Now()
	k1 := ks.keys["k1"]
	with := func(mod func(jwt.MapClaims)) jwt.MapClaims { c := goodClaims(now); mod(c); return c }
	hs, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, goodClaims(now)).SignedString([]byte("secret"))
	none, _ := jwt.NewWithClaims(jwt.SigningMethodNone, goodClaims(now)).SignedString(jwt.UnsafeAllowNoneSignatureType)
	// key confusion: HS256 keyed with the public key's bytes
	pubAsHMAC, _ := jwt.NewWithClaims(jwt.SigningMethodHS256, goodClaims(now)).SignedString(k1.PublicKey.N.Bytes())

	for _, c := range []struct {
		name  string
		token string
		ok    bool
	}{
		{"valid", signRS(t, k1, "k1", goodClaims(now)), true},
		{"issuer graph", signRS(t, k1, "k1", with(func(c jwt.MapClaims) { c["iss"] = "https://graph.microsoft.com" })), true},
		{"within skew", signRS(t, k1, "k1", with(func(c jwt.MapClaims) { c["exp"] = now.Add(-time.Minute).Unix() })), true},
		{"expired", signRS(t, k1, "k1", with(func(c jwt.MapClaims) { c["exp"] = now.Add(-10 * time.Minute).Unix() })), false},
		{"not yet valid", signRS(t, k1, "k1", with(func(c jwt.MapClaims) { c["nbf"] = now.Add(10 * time.Minute).Unix() })), false},
		{"no exp", signRS(t, k1, "k1", with(func(c jwt.MapClaims) { delete(c, "exp") })), false},
		{"wrong audience", signRS(t, k1, "k1", with(func(c jwt.MapClaims) { c["aud"] = "another-bot" })), false},
		{"wrong issuer", signRS(t, k1, "k1", with(func(c jwt.MapClaims) { c["iss"] = "https://evil.example" })), false},
		{"issuer trailing slash", signRS(t, k1, "k1", with(func(c jwt.MapClaims) { c["iss"] = "https://api.botframework.com/" })), false},
		{"no tid", signRS(t, k1, "k1", with(func(c jwt.MapClaims) { delete(c, "tid") })), false},
		{"other tenant", signRS(t, k1, "k1", with(func(c jwt.MapClaims) { c["tid"] = "9e9e9e9e-0000-4000-8000-000000000000" })), false},
		{"forged key", signRS(t, genKey(t), "k1", goodClaims(now)), false},
		{"unknown kid", signRS(t, genKey(t), "k9", goodClaims(now)), false},
		{"alg none", none, false},
		{"HS256", hs, false},
		{"key confusion", pubAsHMAC, false},
		{"garbage", "a.b.c", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			v := newTestVerifier(t, ks, nil)
			claims, err := v.Verify(context.Background(), c.token)
			if c.ok && (err != nil || claims.TenantID != testTenant) {
				t.Fatalf("Verify = %+v, %v; want tenant %s", claims, err, testTenant)
			}
			if !c.ok && !errors.Is(err, ErrUnauthorized) {
				t.Fatalf("Verify = %+v, %v; want ErrUnauthorized", claims, err)
			}
		})
	}
}

func TestVerifierKeyRefresh(t *testing.T) {
	ks := newKeyServer(t)
	now := time.Now()
	clock := now
	v := newTestVerifier(t, ks, func(c *VerifierConfig) { c.Now = func() time.Time { return clock } })
	ctx := context.Background()
	if _, err := v.Verify(ctx, signRS(t, ks.keys["k1"], "k1", goodClaims(now))); err != nil {
		t.Fatal(err)
	}
	base := ks.fetches.Load()

	// forged kids do not make the verifier hammer the metadata URL: a short burst, then none
	// until the gap refills the allowance
	for i := 0; i < 20; i++ {
		v.Verify(ctx, signRS(t, ks.keys["k1"], "forged", goodClaims(now)))
	}
	if got := ks.fetches.Load() - base; got > refreshBurst-1 {
		t.Errorf("%d metadata fetches for 20 unknown kids at once, want at most the rest of the burst (%d)", got, refreshBurst-1)
	}

	// key rollover: a new kid is picked up once the refresh gap has passed
	ks.keys["k2"] = genKey(t)
	clock = clock.Add(2 * time.Minute)
	tok2 := signRS(t, ks.keys["k2"], "k2", goodClaims(clock))
	if _, err := v.Verify(ctx, tok2); err != nil {
		t.Fatalf("rolled-over key: %v", err)
	}

	// a failed refresh keeps the keys already held
	ks.down.Store(true)
	clock = clock.Add(25 * time.Hour)
	if _, err := v.Verify(ctx, signRS(t, ks.keys["k1"], "k1", goodClaims(clock))); err != nil {
		t.Fatalf("metadata down, known key: %v", err)
	}
}

// Once a day the key set is stale. A token signed with a key already held is accepted at once
// and the set is refreshed in the background: no notification waits for the metadata URL (a
// slow one held every notification of that moment before).
func TestStaleKeysRefreshInTheBackground(t *testing.T) {
	ks := newKeyServer(t)
	now := time.Now()
	var clock atomic.Pointer[time.Time]
	clock.Store(&now)
	v := newTestVerifier(t, ks, func(c *VerifierConfig) { c.Now = func() time.Time { return *clock.Load() } })
	ctx := context.Background()
	if _, err := v.Verify(ctx, signRS(t, ks.keys["k1"], "k1", goodClaims(now))); err != nil {
		t.Fatal(err)
	}
	base := ks.fetches.Load()

	later := now.Add(25 * time.Hour)
	clock.Store(&later)
	gate := make(chan struct{})
	ks.gate.Store(&gate)
	done := make(chan error, 1)
	go func() { _, err := v.Verify(ctx, signRS(t, ks.keys["k1"], "k1", goodClaims(later))); done <- err }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("known key, stale set: %v", err)
		}
	case <-time.After(10 * time.Second): // a bound for a failing test, not a timing
		close(gate)
		t.Fatal("a token signed with a known key waited for the key refresh")
	}
	if !ks.fetchedSince(base) {
		close(gate)
		t.Fatal("the stale key set was not refreshed")
	}
	close(gate)
	// Once the refresh is done the set is fresh: another token fetches nothing.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		v.mu.Lock()
		fresh := v.fetching == nil && v.fetchedAt.Equal(later)
		v.mu.Unlock()
		if fresh {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the background refresh did not complete")
		}
	}
	fetched := ks.fetches.Load()
	if _, err := v.Verify(ctx, signRS(t, ks.keys["k1"], "k1", goodClaims(later.Add(time.Second)))); err != nil {
		t.Fatal(err)
	}
	if got := ks.fetches.Load(); got != fetched {
		t.Errorf("%d more metadata fetches after the refresh, want none", got-fetched)
	}
}

// Prefetch takes the keys before any notification comes, and Ready says whether it has them
// and, if not, why. Failed prefetches do not use up the allowance of refreshes for unknown kids.
func TestPrefetch(t *testing.T) {
	ks := newKeyServer(t)
	v := newTestVerifier(t, ks, nil)
	ctx := context.Background()
	if err := v.Ready(); err == nil {
		t.Fatal("ready before any key was fetched")
	}
	ks.down.Store(true)
	for i := 0; i < 2*refreshBurst; i++ {
		if err := v.Prefetch(ctx); err == nil {
			t.Fatal("prefetch with the metadata down: no error")
		}
	}
	if err := v.Ready(); err == nil || !strings.Contains(err.Error(), "status 500") {
		t.Fatalf("Ready with the metadata down = %v; want the fetch's error", err)
	}
	ks.down.Store(false)
	// the allowance is intact: a token whose key is not held yet still fetches the keys
	if _, err := v.Verify(ctx, signRS(t, ks.keys["k1"], "k1", goodClaims(time.Now()))); err != nil {
		t.Fatalf("token after failed prefetches: %v", err)
	}

	v = newTestVerifier(t, ks, nil)
	if err := v.Prefetch(ctx); err != nil {
		t.Fatal(err)
	}
	if err := v.Ready(); err != nil {
		t.Fatalf("Ready after a prefetch: %v", err)
	}
	fetched := ks.fetches.Load()
	if err := v.Prefetch(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(ctx, signRS(t, ks.keys["k1"], "k1", goodClaims(time.Now()))); err != nil {
		t.Fatal(err)
	}
	if got := ks.fetches.Load(); got != fetched {
		t.Errorf("%d metadata fetches after the prefetch, want none", got-fetched)
	}
}

// Notifications that wait for a key fetch in flight share its outcome: when the metadata is
// down they are all told to come again (503), not refused as signed by an unknown key (401,
// which Graph does not retry: the notification, and maybe the caller, would be lost).
func TestWaitersOfAFailedFetchAreToldToRetry(t *testing.T) {
	ks := newKeyServer(t)
	v := newTestVerifier(t, ks, nil)
	ks.down.Store(true)
	gate := make(chan struct{})
	ks.gate.Store(&gate)
	tok := signRS(t, ks.keys["k1"], "k1", goodClaims(time.Now()))
	const n = 6
	errs := make(chan error, n)
	go func() { _, err := v.Verify(context.Background(), tok); errs <- err }()
	if !ks.fetchedSince(0) {
		close(gate)
		t.Fatal("no key fetch")
	}
	for range n - 1 { // these find the fetch in flight and wait for it
		go func() { _, err := v.Verify(context.Background(), tok); errs <- err }()
	}
	time.Sleep(100 * time.Millisecond) // let them reach the wait; one that does not fetches alone, also failing
	close(gate)
	for range n {
		if err := <-errs; !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrUnauthorized) {
			t.Errorf("Verify while the key fetch failed = %v; want ErrUnavailable only", err)
		}
	}
}

// A request that gives up waiting for a key fetch in flight is told to come again (503), not
// refused as if its token were bad.
func TestVerifyGivenUpWaitingIsUnavailable(t *testing.T) {
	ks := newKeyServer(t)
	v := newTestVerifier(t, ks, nil)
	gate := make(chan struct{})
	ks.gate.Store(&gate)
	defer close(gate)
	go v.Prefetch(context.Background())
	if !ks.fetchedSince(0) {
		t.Fatal("no key fetch")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := v.Verify(ctx, signRS(t, ks.keys["k1"], "k1", goodClaims(time.Now())))
	if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrUnauthorized) {
		t.Fatalf("Verify that gave up waiting for the keys = %v; want ErrUnavailable only", err)
	}
}

func TestVerifyRequestNeedsBearer(t *testing.T) {
	ks := newKeyServer(t)
	v := newTestVerifier(t, ks, nil)
	for _, h := range []string{"", "Basic abc", "Bearer ", "Bearer"} {
		r := httptest.NewRequest("POST", "/api/calls", strings.NewReader("{}"))
		if h != "" {
			r.Header.Set("Authorization", h)
		}
		if _, err := v.VerifyRequest(r); !errors.Is(err, ErrNoToken) {
			t.Errorf("Authorization %q: %v, want ErrNoToken", h, err)
		}
	}
}

func BenchmarkVerifyCached(b *testing.B) {
	ks := newKeyServer(b)
	v, _ := NewVerifier(VerifierConfig{OpenIDConfigURL: ks.srv.URL + "/openid", Audience: testAudience})
	tok := signRS(b, ks.keys["k1"], "k1", goodClaims(time.Now()))
	ctx := context.Background()
	for b.Loop() {
		if _, err := v.Verify(ctx, tok); err != nil {
			b.Fatal(err)
		}
	}
}

// Keys roll over without notice. A token signed with a new key is accepted at once (a refresh
// is allowed); when forged kids have used up the refreshes it is not rejected but deferred
// (503): Graph sends it again, and once the gap has passed the new key is fetched.
func TestVerifierRolloverWithinRefreshGap(t *testing.T) {
	ks := newKeyServer(t)
	clock := time.Now()
	v := newTestVerifier(t, ks, func(c *VerifierConfig) { c.Now = func() time.Time { return clock } })
	ctx := context.Background()
	if _, err := v.Verify(ctx, signRS(t, ks.keys["k1"], "k1", goodClaims(clock))); err != nil {
		t.Fatal(err)
	}
	ks.keys["k1b"] = genKey(t)
	if _, err := v.Verify(ctx, signRS(t, ks.keys["k1b"], "k1b", goodClaims(clock))); err != nil {
		t.Fatalf("a rollover right after start-up: %v, want the new key fetched at once", err)
	}
	for i := 0; i < 5; i++ { // forged kids use up what is left of the burst
		v.Verify(ctx, signRS(t, ks.keys["k1"], "forged", goodClaims(clock)))
	}
	ks.keys["k2"] = genKey(t)
	tok := signRS(t, ks.keys["k2"], "k2", goodClaims(clock))
	clock = clock.Add(time.Second)
	_, err := v.Verify(ctx, tok)
	if !errors.Is(err, ErrUnavailable) || errors.Is(err, ErrUnauthorized) {
		t.Fatalf("new key within the gap: %v, want ErrUnavailable (retry), not a rejection", err)
	}
	clock = clock.Add(15 * time.Second)
	if _, err := v.Verify(ctx, tok); err != nil {
		t.Fatalf("new key after the gap: %v", err)
	}

	h := &Webhook{Auth: v, Sink: &recordingSink{}, Log: zaptest.NewLogger(t)}
	ks.keys["k3"] = genKey(t)
	r := httptest.NewRequest("POST", "/api/calls", strings.NewReader(`{"value":[]}`))
	r.Header.Set("Authorization", "Bearer "+signRS(t, ks.keys["k3"], "k3", goodClaims(clock)))
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	if w.Code != http.StatusServiceUnavailable || w.Header().Get("Retry-After") == "" {
		t.Errorf("webhook: %d (Retry-After %q), want 503 with Retry-After", w.Code, w.Header().Get("Retry-After"))
	}
}

// The documented example of a callback token's claims verifies once its times are current, and
// gives the tenant callbot records for the call.
func TestDocumentedCallbackTokenClaims(t *testing.T) {
	raw, err := os.ReadFile("testdata/payloads/inbound-callback-token-claims-example.json")
	if err != nil {
		t.Fatal(err)
	}
	var claims jwt.MapClaims
	if err := json.Unmarshal(raw, &claims); err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	claims["iat"], claims["nbf"], claims["exp"] = now.Unix(), now.Unix(), now.Add(65*time.Minute).Unix()
	ks := newKeyServer(t)
	v := newTestVerifier(t, ks, func(c *VerifierConfig) {
		c.Audience, c.AllowedTenants = claims["aud"].(string), []string{claims["tid"].(string)}
	})
	got, err := v.Verify(context.Background(), signRS(t, ks.keys["k1"], "k1", claims))
	if err != nil || got.TenantID != "1fdd12d0-4620-44ed-baec-459b611f84b2" || got.Issuer != "https://api.botframework.com" {
		t.Errorf("documented claims: %+v, %v", got, err)
	}
}

// A key fetch started for one request serves every token that waits for it, so the request
// that started it must not be able to cancel it. An attacker who sends tokens with made-up kids
// and hangs up at once (its request's context ends) used to cancel each fetch it triggered:
// the refreshes allowed were used up with nothing fetched, and after a genuine key rollover
// every real notification got 503 for as long as the attacker kept it up.
func TestKeyFetchNotCancelledByTheRequestThatStartedIt(t *testing.T) {
	ks := newKeyServer(t)
	clock := time.Now()
	v := newTestVerifier(t, ks, func(c *VerifierConfig) { c.Now = func() time.Time { return clock } })
	if _, err := v.Verify(context.Background(), signRS(t, ks.keys["k1"], "k1", goodClaims(clock))); err != nil {
		t.Fatal(err)
	}
	ks.keys["k2"] = genKey(t)             // Microsoft rolls its keys over
	for i := 0; i < refreshBurst-1; i++ { // the refreshes the first token left
		gate := make(chan struct{})
		ks.gate.Store(&gate)
		base := ks.fetches.Load()
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			_, err := v.Verify(ctx, signRS(t, ks.keys["k1"], fmt.Sprintf("made-up-%d", i), goodClaims(clock)))
			errc <- err
		}()
		fetching := ks.fetchedSince(base)
		cancel() // the attacker hangs up while the fetch it started is in flight
		<-errc
		close(gate)
		ks.gate.Store(nil)
		if !fetching {
			break // no refresh left
		}
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
			v.mu.Lock()
			idle := v.fetching == nil
			v.mu.Unlock()
			if idle {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the key fetch did not end")
			}
		}
	}
	if _, err := v.Verify(context.Background(), signRS(t, ks.keys["k2"], "k2", goodClaims(clock))); err != nil {
		t.Fatalf("token signed with the rolled-over key after an attacker hung up on the key fetches: %v", err)
	}
}

// Microsoft's key sets carry each key both as n and e and as a certificate (x5c); some
// verifiers of the calling webhook's keys read only the certificate. A set that publishes a key
// as a certificate alone must verify as well: callbot found no usable key in it, and would
// never have become ready.
func TestVerifierReadsKeysPublishedAsCertificates(t *testing.T) {
	ks := newKeyServer(t)
	ks.certs.Store(true)
	v := newTestVerifier(t, ks, nil)
	if _, err := v.Verify(context.Background(), signRS(t, ks.keys["k1"], "k1", goodClaims(time.Now()))); err != nil {
		t.Fatalf("a token signed by a key published as a certificate: %v", err)
	}
	other := genKey(t)
	if _, err := v.Verify(context.Background(), signRS(t, other, "k1", goodClaims(time.Now()))); err == nil {
		t.Fatal("a token signed by another key under the same kid verified")
	}
}

// jwksServer publishes the key set body as it is, for the odd sets a publisher may serve.
func jwksServer(t *testing.T, body string) *httptest.Server {
	t.Helper()
	var srv *httptest.Server
	mux := http.NewServeMux()
	mux.HandleFunc("/openid", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]string{"issuer": "https://api.botframework.com", "jwks_uri": srv.URL + "/keys"})
	})
	mux.HandleFunc("/keys", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, body) })
	srv = httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

// jwk is k's public key as a JWK entry (n and e), with fields added or replaced by extra.
func jwk(kid string, k *rsa.PrivateKey, extra map[string]any) map[string]any {
	m := map[string]any{"kty": "RSA", "kid": kid, "use": "sig",
		"n": base64.RawURLEncoding.EncodeToString(k.N.Bytes()),
		"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(k.E)).Bytes())}
	maps.Copy(m, extra)
	return m
}

// A key set is read key by key: whatever one entry holds (a field of an unexpected type, two
// keys under one kid, an n and e that do not decode beside a good certificate), every good key
// of the set verifies its tokens, and a token signed by a key the set does not hold verifies
// under none. Before, an entry with an x5c that is not an array (or a kid that is not a string)
// failed the decoding of the whole set, so no key of it was usable (a start never became ready, a
// rollover was not followed); of two keys under one kid only the last was kept, and tokens signed
// with the first were rejected (401); and a key whose n did not decode was left out even when
// its certificate held it.
func TestEveryGoodKeyOfAnOddKeySetVerifies(t *testing.T) {
	good, second, forger := genKey(t), genKey(t), genKey(t)
	cert := map[string]any{"x5c": []string{selfSigned(t, good)}}
	stdN := base64.StdEncoding.EncodeToString(good.N.Bytes()) // the wrong alphabet: + and /
	for !strings.ContainsAny(stdN, "+/") {
		good = genKey(t)
		cert = map[string]any{"x5c": []string{selfSigned(t, good)}}
		stdN = base64.StdEncoding.EncodeToString(good.N.Bytes())
	}
	for _, tc := range []struct {
		name string
		set  []any
		kid  string
		keys []*rsa.PrivateKey // the keys whose tokens under kid must verify
	}{
		{"an entry with an x5c that is no array", []any{
			jwk("odd", second, map[string]any{"x5c": "MIIB"}), jwk("k1", good, nil)}, "k1", []*rsa.PrivateKey{good}},
		{"an entry whose kid is a number", []any{
			map[string]any{"kty": "RSA", "kid": 7, "n": "AQAB", "e": "AQAB"}, jwk("k1", good, nil)}, "k1", []*rsa.PrivateKey{good}},
		{"two keys under one kid", []any{
			jwk("k1", good, nil), jwk("k1", second, nil)}, "k1", []*rsa.PrivateKey{good, second}},
		{"an n that does not decode beside a good certificate", []any{
			jwk("k1", good, map[string]any{"n": stdN, "x5c": cert["x5c"]})}, "k1", []*rsa.PrivateKey{good}},
		{"an n too short to verify anything beside a good certificate", []any{
			jwk("k1", good, map[string]any{"n": base64.RawURLEncoding.EncodeToString(good.N.Bytes()[:64]), "x5c": cert["x5c"]})}, "k1", []*rsa.PrivateKey{good}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body, err := json.Marshal(map[string]any{"keys": tc.set})
			if err != nil {
				t.Fatal(err)
			}
			srv := jwksServer(t, string(body))
			v, err := NewVerifier(VerifierConfig{OpenIDConfigURL: srv.URL + "/openid", Audience: testAudience})
			if err != nil {
				t.Fatal(err)
			}
			for i, k := range tc.keys {
				if _, err := v.Verify(context.Background(), signRS(t, k, tc.kid, goodClaims(time.Now()))); err != nil {
					t.Errorf("token signed by good key %d of the set: %v", i+1, err)
				}
			}
			if _, err := v.Verify(context.Background(), signRS(t, forger, tc.kid, goodClaims(time.Now()))); !errors.Is(err, ErrUnauthorized) {
				t.Errorf("token signed by a key the set lacks: %v, want %v", err, ErrUnauthorized)
			}
		})
	}
}

// A key set whose keys cannot verify any token (a modulus cut short, 512 bits, or an exponent of
// 1: crypto/rsa refuses both) has no usable key: the fetch fails, readiness says so, and a token
// gets 503 (Graph delivers it again) while callbot waits for a usable set. Such a key was taken
// as usable: callbot became ready, and every notification was refused as unauthorized (401),
// which Graph does not deliver again.
func TestKeysThatCannotVerifyAreNotUsable(t *testing.T) {
	good := genKey(t)
	for _, tc := range []struct {
		name string
		key  map[string]any
	}{
		{"a modulus of 512 bits", jwk("k1", good, map[string]any{"n": base64.RawURLEncoding.EncodeToString(good.N.Bytes()[:64])})},
		{"an exponent of 1", jwk("k1", good, map[string]any{"e": "AQ"})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			body, err := json.Marshal(map[string]any{"keys": []any{tc.key}})
			if err != nil {
				t.Fatal(err)
			}
			srv := jwksServer(t, string(body))
			v, err := NewVerifier(VerifierConfig{OpenIDConfigURL: srv.URL + "/openid", Audience: testAudience})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := v.Verify(context.Background(), signRS(t, good, "k1", goodClaims(time.Now()))); !errors.Is(err, ErrUnavailable) {
				t.Errorf("a token whose kid has only a key that cannot verify: %v, want %v (no usable key fetched)", err, ErrUnavailable)
			}
		})
	}
}
