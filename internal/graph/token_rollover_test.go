package graph

import (
	"context"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"math/big"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// A token whose kid is unknown and that comes while a key fetch begun before it is in flight (the
// daily background refresh, its key set read before Microsoft rolled its keys over) waits for that
// fetch. The fetch cannot have the new key: the token is no forgery for that, and must not be
// refused for good (403, which Graph does not retry: the notification lost) as one whose kid a
// fetch made after it came did not know.
func TestUnknownKidAfterAFetchBegunBeforeItIsNotRefused(t *testing.T) {
	var mu sync.Mutex
	keys := map[string]*rsa.PrivateKey{"k1": genKey(t)}
	var gate chan struct{}
	read := make(chan struct{}, 10)
	var srv *httptest.Server
	mux := http.NewServeMux()
	mux.HandleFunc("/openid", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]string{"issuer": "https://api.botframework.com", "jwks_uri": srv.URL + "/keys"})
	})
	mux.HandleFunc("/keys", func(w http.ResponseWriter, r *http.Request) {
		var set struct {
			Keys []map[string]string `json:"keys"`
		}
		mu.Lock()
		for kid, k := range keys {
			set.Keys = append(set.Keys, map[string]string{"kty": "RSA", "kid": kid, "use": "sig",
				"n": base64.RawURLEncoding.EncodeToString(k.N.Bytes()),
				"e": base64.RawURLEncoding.EncodeToString(big.NewInt(int64(k.E)).Bytes())})
		}
		g := gate
		mu.Unlock()
		read <- struct{}{}
		if g != nil {
			<-g // the key set is read; the answer is slow
		}
		json.NewEncoder(w).Encode(set)
	})
	srv = httptest.NewServer(mux)
	t.Cleanup(srv.Close)

	clock := time.Now()
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	v, err := NewVerifier(VerifierConfig{OpenIDConfigURL: srv.URL + "/openid", Audience: testAudience,
		AllowedTenants: []string{testTenant}, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	k1 := keys["k1"]
	mu.Unlock()
	if _, err := v.Verify(context.Background(), signRS(t, k1, "k1", goodClaims(now()))); err != nil {
		t.Fatal(err)
	}
	<-read
	// a day later a token with the known kid starts the background refresh; its key set is read
	// before the rollover
	mu.Lock()
	clock = clock.Add(25 * time.Hour)
	gate = make(chan struct{})
	g := gate
	mu.Unlock()
	if _, err := v.Verify(context.Background(), signRS(t, k1, "k1", goodClaims(now()))); err != nil {
		t.Fatal(err)
	}
	<-read
	k2 := genKey(t)
	mu.Lock()
	keys["k2"] = k2 // Microsoft rolls its keys over
	gate = nil
	mu.Unlock()
	errc := make(chan error, 1)
	go func() {
		_, err := v.Verify(context.Background(), signRS(t, k2, "k2", goodClaims(now())))
		errc <- err
	}()
	v.mu.Lock()
	inFlight := v.fetching != nil
	v.mu.Unlock()
	if !inFlight {
		t.Fatal("no fetch in flight")
	}
	time.Sleep(50 * time.Millisecond) // the token waits for the fetch in flight
	close(g)
	if err := <-errc; errors.Is(err, ErrUnauthorized) {
		t.Errorf("a genuine token with the new kid, come while a fetch begun before it was in flight: %v; want it verified (or 503, delivered again)", err)
	}
}
