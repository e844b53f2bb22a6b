package msgraph

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
)

// tokenRefreshMargin is how long before its expiry a cached token is replaced. It is MSAL's own
// margin: MSAL treats a token that expires within 5 minutes as expired, so the cache refreshes
// when azidentity alone would have.
const tokenRefreshMargin = 5 * time.Minute

// tokenCache is an azcore.TokenCredential that keeps its credential's last token for each set of
// request options (scopes, tenant, CAE) and hands it out until it is due for refresh.
//
// It exists for CPU. kiota asks for a token on every Graph request, and an azidentity credential
// answers each time through MSAL's AcquireTokenSilent (a cache search under a credential-wide
// mutex): about 6% of callbot's CPU at 100 calls/s. MSAL still fetches and caches the tokens;
// this cache only saves asking it.
//
// A token is due for refresh tokenRefreshMargin before it expires (half its lifetime before, for
// a token that lives less than twice the margin), or at its RefreshOn time when the authority
// suggested an earlier one. At most one fetch per options is in flight: while it runs, other
// requests keep using the old token if it has not expired yet, and otherwise wait for the fetch
// and share its result. The request whose fetch fails gets the credential's error unchanged, and
// nothing is cached, so the next request tries again. A request with Claims (a claims challenge)
// always goes to the credential, and the token it gets replaces the cached one.
type tokenCache struct {
	cred azcore.TokenCredential
	now  func() time.Time

	mu      sync.RWMutex
	entries map[tokenKey]*tokenEntry
}

func newTokenCache(cred azcore.TokenCredential, now func() time.Time) *tokenCache {
	return &tokenCache{cred: cred, now: now, entries: map[tokenKey]*tokenEntry{}}
}

// tokenKey is what, besides the credential, decides which token a request gets.
type tokenKey struct {
	scopes   string // joined by spaces
	tenantID string
	cae      bool
}

// tokenEntry holds one key's token and its fetch in flight.
type tokenEntry struct {
	cur atomic.Pointer[cachedToken] // nil until the first fetch succeeds

	mu      sync.Mutex
	pending *tokenFetch // nil when no fetch is in flight
}

type cachedToken struct {
	tok       azcore.AccessToken
	refreshAt time.Time
}

// tokenFetch is one call to the credential; tok and err are set before done is closed.
type tokenFetch struct {
	done chan struct{}
	tok  azcore.AccessToken
	err  error
}

// GetToken implements azcore.TokenCredential. Errors: the credential's, or ctx.Err() when ctx
// ends while waiting for another request's fetch.
func (c *tokenCache) GetToken(ctx context.Context, opts policy.TokenRequestOptions) (azcore.AccessToken, error) {
	e := c.entry(opts)
	if opts.Claims != "" {
		tok, err := c.cred.GetToken(ctx, opts)
		if err == nil {
			e.store(tok, c.now())
		}
		return tok, err
	}
	for {
		now := c.now()
		cur := e.cur.Load()
		if cur != nil && now.Before(cur.refreshAt) {
			return cur.tok, nil
		}
		e.mu.Lock()
		f := e.pending
		lead := f == nil
		if lead {
			f = &tokenFetch{done: make(chan struct{})}
			e.pending = f
		}
		e.mu.Unlock()
		if lead {
			return c.fetch(ctx, e, f, opts)
		}
		if cur != nil && now.Before(cur.tok.ExpiresOn) {
			return cur.tok, nil // still valid while another request refreshes it
		}
		select {
		case <-f.done:
		case <-ctx.Done():
			return azcore.AccessToken{}, ctx.Err()
		}
		if f.err != nil && ctx.Err() == nil &&
			(errors.Is(f.err, context.Canceled) || errors.Is(f.err, context.DeadlineExceeded)) {
			continue // the fetch ended with its own request's context, not with this one's
		}
		return f.tok, f.err
	}
}

// fetch calls the credential for the request that leads f, caches a token it gets, and hands the
// result to the requests waiting for f.
func (c *tokenCache) fetch(ctx context.Context, e *tokenEntry, f *tokenFetch, opts policy.TokenRequestOptions) (azcore.AccessToken, error) {
	// Deferred so that waiters are released even if the credential panics.
	defer func() {
		e.mu.Lock()
		e.pending = nil
		e.mu.Unlock()
		close(f.done)
	}()
	f.tok, f.err = c.cred.GetToken(ctx, opts)
	if f.err == nil {
		e.store(f.tok, c.now())
	}
	return f.tok, f.err
}

func (c *tokenCache) entry(opts policy.TokenRequestOptions) *tokenEntry {
	k := tokenKey{scopes: strings.Join(opts.Scopes, " "), tenantID: opts.TenantID, cae: opts.EnableCAE}
	c.mu.RLock()
	e := c.entries[k]
	c.mu.RUnlock()
	if e != nil {
		return e
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e = c.entries[k]; e == nil {
		e = &tokenEntry{}
		c.entries[k] = e
	}
	return e
}

// store caches tok, fetched at now.
func (e *tokenEntry) store(tok azcore.AccessToken, now time.Time) {
	margin := min(tokenRefreshMargin, max(tok.ExpiresOn.Sub(now)/2, 0))
	at := tok.ExpiresOn.Add(-margin)
	if !tok.RefreshOn.IsZero() && tok.RefreshOn.Before(at) {
		at = tok.RefreshOn
	}
	e.cur.Store(&cachedToken{tok: tok, refreshAt: at})
}
