package msgraph

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"

	"github.com/callbot/callbot/internal/graph"
)

// fakeCredential issues numbered tokens ("tenant-1", "tenant-2"...) that expire life after the
// clock's now, counting the calls.
type fakeCredential struct {
	name string
	now  func() time.Time
	life time.Duration
	// refreshIn, when set, is the RefreshOn of each token, relative to now.
	refreshIn time.Duration

	mu    sync.Mutex
	calls int
	opts  []policy.TokenRequestOptions
	err   error
	// gate, when set, makes GetToken wait for it to be closed, or for ctx to end.
	gate chan struct{}
}

func (f *fakeCredential) GetToken(ctx context.Context, opts policy.TokenRequestOptions) (azcore.AccessToken, error) {
	f.mu.Lock()
	f.calls++
	n := f.calls
	f.opts = append(f.opts, opts)
	gate, err := f.gate, f.err
	f.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return azcore.AccessToken{}, fmt.Errorf("fake token request: %w", ctx.Err())
		}
	}
	if err != nil {
		return azcore.AccessToken{}, err
	}
	now := f.now()
	tok := azcore.AccessToken{Token: fmt.Sprintf("%s-%d", f.name, n), ExpiresOn: now.Add(f.life)}
	if f.refreshIn > 0 {
		tok.RefreshOn = now.Add(f.refreshIn)
	}
	return tok, nil
}

func (f *fakeCredential) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func (f *fakeCredential) set(err error, gate chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err, f.gate = err, gate
}

// fakeNow is a clock moved by hand.
type fakeNow struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeNow) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeNow) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

var graphScopes = policy.TokenRequestOptions{Scopes: []string{graphScope}, EnableCAE: true}

func mustToken(t *testing.T, c azcore.TokenCredential, ctx context.Context, opts policy.TokenRequestOptions) string {
	t.Helper()
	tok, err := c.GetToken(ctx, opts)
	if err != nil {
		t.Fatalf("GetToken: %v", err)
	}
	return tok.Token
}

func TestTokenCacheRefreshesBeforeExpiry(t *testing.T) {
	for _, tc := range []struct {
		name      string
		life      time.Duration
		refreshIn time.Duration
		fresh     time.Duration // how long the first token is served
	}{
		{name: "one hour", life: time.Hour, fresh: 55 * time.Minute},
		{name: "short-lived", life: 4 * time.Minute, fresh: 2 * time.Minute},
		{name: "refresh_in", life: 2 * time.Hour, refreshIn: 30 * time.Minute, fresh: 30 * time.Minute},
		{name: "refresh_in after the margin", life: time.Hour, refreshIn: 58 * time.Minute, fresh: 55 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := &fakeNow{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
			cred := &fakeCredential{name: "tok", now: clk.now, life: tc.life, refreshIn: tc.refreshIn}
			c := newTokenCache(cred, clk.now)
			ctx := context.Background()
			for range 3 {
				if got := mustToken(t, c, ctx, graphScopes); got != "tok-1" {
					t.Fatalf("token %s, want tok-1", got)
				}
			}
			clk.add(tc.fresh - time.Second)
			if got := mustToken(t, c, ctx, graphScopes); got != "tok-1" {
				t.Errorf("a second before refresh: token %s, want tok-1", got)
			}
			clk.add(time.Second)
			if got := mustToken(t, c, ctx, graphScopes); got != "tok-2" {
				t.Errorf("at refresh: token %s, want tok-2", got)
			}
			if got := mustToken(t, c, ctx, graphScopes); got != "tok-2" {
				t.Errorf("after refresh: token %s, want tok-2", got)
			}
			if n := cred.callCount(); n != 2 {
				t.Errorf("credential called %d times, want 2", n)
			}
		})
	}
}

func TestTokenCacheReturnsCredentialError(t *testing.T) {
	clk := &fakeNow{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	cred := &fakeCredential{name: "tok", now: clk.now, life: time.Hour}
	c := newTokenCache(cred, clk.now)
	ctx := context.Background()
	errToken := errors.New("AADSTS7000215: invalid client secret")

	cred.set(errToken, nil)
	for i := range 2 {
		if _, err := c.GetToken(ctx, graphScopes); err != errToken {
			t.Errorf("call %d: err = %v, want the credential's error unchanged", i, err)
		}
	}
	if n := cred.callCount(); n != 2 {
		t.Errorf("credential called %d times, want 2: a failure must not be cached", n)
	}

	cred.set(nil, nil)
	if got := mustToken(t, c, ctx, graphScopes); got != "tok-3" {
		t.Errorf("after recovery: token %s, want tok-3", got)
	}

	// A failed refresh while the old token is still valid surfaces too (as it does without the
	// cache: MSAL treats the token as expired 5 minutes early), and the next request retries.
	clk.add(56 * time.Minute)
	cred.set(errToken, nil)
	if _, err := c.GetToken(ctx, graphScopes); err != errToken {
		t.Errorf("failed refresh: err = %v, want the credential's error", err)
	}
	cred.set(nil, nil)
	if got := mustToken(t, c, ctx, graphScopes); got != "tok-5" {
		t.Errorf("after a failed refresh: token %s, want tok-5", got)
	}
}

func TestTokenCacheKeys(t *testing.T) {
	clk := &fakeNow{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	cred := &fakeCredential{name: "tok", now: clk.now, life: time.Hour}
	c := newTokenCache(cred, clk.now)
	ctx := context.Background()
	other := policy.TokenRequestOptions{Scopes: []string{"https://other.example/.default"}, EnableCAE: true}
	noCAE := policy.TokenRequestOptions{Scopes: graphScopes.Scopes}
	for range 2 {
		for _, want := range []struct {
			opts policy.TokenRequestOptions
			tok  string
		}{{graphScopes, "tok-1"}, {other, "tok-2"}, {noCAE, "tok-3"}} {
			if got := mustToken(t, c, ctx, want.opts); got != want.tok {
				t.Errorf("options %+v: token %s, want %s", want.opts, got, want.tok)
			}
		}
	}

	// A claims challenge always reaches the credential, and its token replaces the cached one.
	claims := graphScopes
	claims.Claims = `{"access_token":{"nbf":{"essential":true,"value":"1767322800"}}}`
	if got := mustToken(t, c, ctx, claims); got != "tok-4" {
		t.Errorf("with claims: token %s, want tok-4", got)
	}
	if got := mustToken(t, c, ctx, graphScopes); got != "tok-4" {
		t.Errorf("after claims: token %s, want tok-4", got)
	}
	if n := cred.callCount(); n != 4 {
		t.Errorf("credential called %d times, want 4", n)
	}
}

func TestTenantCredentialsCachePerTenant(t *testing.T) {
	const home, other = "72f988bf-86f1-41af-91ab-2d7cd011db47", "0c5a3b1e-6f2d-4e8a-9b7c-1d2e3f4a5b6c"
	clk := &fakeNow{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
	creds := map[string]*fakeCredential{}
	var mu sync.Mutex
	tc, err := newTenantCredentials(home, true, func(tenant string) (azcore.TokenCredential, error) {
		mu.Lock()
		defer mu.Unlock()
		// The credential is made with the spelling of the tenant's first request.
		tenant = strings.ToLower(tenant)
		c := &fakeCredential{name: tenant, now: clk.now, life: time.Hour}
		creds[tenant] = c
		return c, nil
	}, clk.now)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		for tenant, want := range map[string]string{
			"": home + "-1", home: home + "-1", other: other + "-1", "0C5A3B1E-6F2D-4E8A-9B7C-1D2E3F4A5B6C": other + "-1",
		} {
			ctx := graph.WithTenantID(context.Background(), tenant)
			if got := mustToken(t, tc, ctx, graphScopes); got != want {
				t.Errorf("tenant %q: token %s, want %s", tenant, got, want)
			}
		}
	}
	clk.add(56 * time.Minute)
	ctx := graph.WithTenantID(context.Background(), other)
	if got := mustToken(t, tc, ctx, graphScopes); got != other+"-2" {
		t.Errorf("tenant %s after 56 minutes: token %s, want %s-2", other, got, other)
	}
	for tenant, c := range creds {
		if n, want := c.callCount(), map[string]int{home: 1, other: 2}[tenant]; n != want {
			t.Errorf("tenant %s: credential called %d times, want %d", tenant, n, want)
		}
	}
}

// TestTokenCacheConcurrentFetch checks that concurrent requests without a usable token share one
// fetch (no thundering herd), and share its error too.
func TestTokenCacheConcurrentFetch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cred := &fakeCredential{name: "tok", now: time.Now, life: time.Hour}
		c := newTokenCache(cred, time.Now)
		errToken := errors.New("token endpoint unavailable")
		for _, tc := range []struct {
			err  error
			want string
		}{{errToken, ""}, {nil, "tok-2"}} {
			gate := make(chan struct{})
			cred.set(tc.err, gate)
			before := cred.callCount()
			const n = 50
			toks, errs := make([]string, n), make([]error, n)
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() {
					tok, err := c.GetToken(context.Background(), graphScopes)
					toks[i], errs[i] = tok.Token, err
				})
			}
			synctest.Wait() // all 50 are blocked: one in the credential, the others on its fetch
			if got := cred.callCount() - before; got != 1 {
				t.Errorf("%d concurrent fetches, want 1", got)
			}
			close(gate)
			wg.Wait()
			for i := range n {
				if toks[i] != tc.want || errs[i] != tc.err {
					t.Errorf("request %d: token %q, err %v; want %q, %v", i, toks[i], errs[i], tc.want, tc.err)
				}
			}
		}
	})
}

// TestTokenCacheRefreshDoesNotBlock checks that while one request refreshes a token that has not
// expired yet, the others keep using it without waiting.
func TestTokenCacheRefreshDoesNotBlock(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cred := &fakeCredential{name: "tok", now: time.Now, life: time.Hour}
		c := newTokenCache(cred, time.Now)
		ctx := context.Background()
		mustToken(t, c, ctx, graphScopes)
		time.Sleep(56 * time.Minute) // synctest's clock: within the refresh margin
		gate := make(chan struct{})
		cred.set(nil, gate)
		refreshed := make(chan string)
		go func() {
			tok, _ := c.GetToken(ctx, graphScopes)
			refreshed <- tok.Token
		}()
		synctest.Wait() // the refresh is waiting in the credential
		for range 3 {
			if got := mustToken(t, c, ctx, graphScopes); got != "tok-1" {
				t.Errorf("during the refresh: token %s, want the old tok-1", got)
			}
		}
		close(gate)
		if got := <-refreshed; got != "tok-2" {
			t.Errorf("refreshing request got %s, want tok-2", got)
		}
		if got := mustToken(t, c, ctx, graphScopes); got != "tok-2" {
			t.Errorf("after the refresh: token %s, want tok-2", got)
		}
		if n := cred.callCount(); n != 2 {
			t.Errorf("credential called %d times, want 2", n)
		}
	})
}

// TestTokenCacheWaiterContext checks the contexts of a shared fetch: a waiter stops waiting when
// its own context ends, and fetches for itself when the fetch it waited for ended with the
// context of the request that led it.
func TestTokenCacheWaiterContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cred := &fakeCredential{name: "tok", now: time.Now, life: time.Hour}
		c := newTokenCache(cred, time.Now)
		gate := make(chan struct{})
		cred.set(nil, gate)

		leadCtx, cancelLead := context.WithCancel(context.Background())
		leadErr := make(chan error)
		go func() {
			_, err := c.GetToken(leadCtx, graphScopes)
			leadErr <- err
		}()
		synctest.Wait()

		// A waiter whose deadline passes gives up with its own context's error.
		shortCtx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		if _, err := c.GetToken(shortCtx, graphScopes); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("waiter past its deadline: err = %v, want context.DeadlineExceeded", err)
		}

		// A waiter outliving the leader's context fetches again for itself.
		got := make(chan string)
		go func() {
			tok, err := c.GetToken(context.Background(), graphScopes)
			if err != nil {
				t.Errorf("waiter: %v", err)
			}
			got <- tok.Token
		}()
		synctest.Wait()
		cancelLead()
		if err := <-leadErr; !errors.Is(err, context.Canceled) {
			t.Errorf("leader: err = %v, want context.Canceled", err)
		}
		synctest.Wait() // the waiter is now in the credential itself
		close(gate)
		if tok := <-got; tok != "tok-2" {
			t.Errorf("waiter got %s, want tok-2 from its own fetch", tok)
		}
	})
}
