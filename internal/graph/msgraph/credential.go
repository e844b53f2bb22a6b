package msgraph

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/cloud"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"

	"github.com/callbot/callbot/internal/graph"
)

// maxTenants bounds how many tenant credentials a multi-tenant Client keeps. Tenants come from
// validated callback tokens, so the bound only guards against a misconfigured allow-list.
const maxTenants = 1000

// credentialFactory returns the function that builds the app's credential for one tenant: a
// client secret credential, or a client certificate credential from cfg.CertFile (read and
// parsed once, here, so a bad file fails New rather than the first call).
func credentialFactory(cfg Config, base http.RoundTripper) (func(tenant string) (azcore.TokenCredential, error), error) {
	client := azcore.ClientOptions{
		Cloud:     cloud.Configuration{ActiveDirectoryAuthorityHost: cfg.AuthorityHost},
		Transport: &http.Client{Transport: base, Timeout: cfg.Timeout},
	}
	if cfg.ClientSecret != "" {
		return func(tenant string) (azcore.TokenCredential, error) {
			c, err := azidentity.NewClientSecretCredential(tenant, cfg.ClientID, cfg.ClientSecret,
				&azidentity.ClientSecretCredentialOptions{
					ClientOptions: client,
					// Instance discovery asks login.microsoftonline.com about the authority; with
					// it off MSAL reads {authority}/{tenant}/v2.0/.well-known/openid-configuration.
					DisableInstanceDiscovery: true,
				})
			if err != nil {
				return nil, fmt.Errorf("client secret credential for tenant %s: %w", tenant, err)
			}
			return c, nil
		}, nil
	}
	data, err := os.ReadFile(cfg.CertFile)
	if err != nil {
		return nil, fmt.Errorf("msgraph: Config.CertFile: %w", err)
	}
	var password []byte
	if cfg.CertPassword != "" {
		password = []byte(cfg.CertPassword)
	}
	certs, key, err := azidentity.ParseCertificates(data, password)
	if err != nil {
		return nil, fmt.Errorf("msgraph: Config.CertFile %s: %w", cfg.CertFile, err)
	}
	return func(tenant string) (azcore.TokenCredential, error) {
		c, err := azidentity.NewClientCertificateCredential(tenant, cfg.ClientID, certs, key,
			&azidentity.ClientCertificateCredentialOptions{ClientOptions: client, DisableInstanceDiscovery: true})
		if err != nil {
			return nil, fmt.Errorf("client certificate credential for tenant %s: %w", tenant, err)
		}
		return c, nil
	}, nil
}

// tenantCredentials is the token credential the Graph pipeline uses. It serves the home tenant's
// credential, or, when multi-tenant and the request's context names another tenant
// (graph.WithTenantID), that tenant's credential, created on first use and kept. Each tenant's
// credential sits behind a tokenCache, so a request normally costs a map lookup, not a trip
// through MSAL.
type tenantCredentials struct {
	home     string
	multi    bool
	newCred  func(tenant string) (azcore.TokenCredential, error)
	homeCred azcore.TokenCredential

	mu    sync.Mutex
	creds map[string]azcore.TokenCredential // by lowercase tenant id
}

// newTenantCredentials builds the home tenant's credential at once and the others on first use,
// each with newCred and behind a tokenCache reading the clock now.
func newTenantCredentials(home string, multi bool, newCred func(string) (azcore.TokenCredential, error),
	now func() time.Time) (*tenantCredentials, error) {
	cached := func(tenant string) (azcore.TokenCredential, error) {
		c, err := newCred(tenant)
		if err != nil {
			return nil, err
		}
		return newTokenCache(c, now), nil
	}
	hc, err := cached(home)
	if err != nil {
		return nil, fmt.Errorf("msgraph: %w", err)
	}
	return &tenantCredentials{home: home, multi: multi, newCred: cached, homeCred: hc,
		creds: map[string]azcore.TokenCredential{}}, nil
}

// GetToken implements azcore.TokenCredential. A failure is flagged on the request's attempt so
// that the retry loop knows no Graph request was sent and does not repeat it: azcore has already
// retried the token endpoint's transient failures.
func (t *tenantCredentials) GetToken(ctx context.Context, opts policy.TokenRequestOptions) (azcore.AccessToken, error) {
	cred, err := t.forTenant(graph.TenantID(ctx))
	if err == nil {
		var tok azcore.AccessToken
		tok, err = cred.GetToken(ctx, opts)
		if err == nil {
			return tok, nil
		}
	}
	if a := attemptFrom(ctx); a != nil {
		a.tokenFailed.Store(true)
	}
	return azcore.AccessToken{}, err
}

func (t *tenantCredentials) forTenant(tenant string) (azcore.TokenCredential, error) {
	if !t.multi || tenant == "" || strings.EqualFold(tenant, t.home) {
		return t.homeCred, nil
	}
	key := strings.ToLower(tenant)
	t.mu.Lock()
	defer t.mu.Unlock()
	if c, ok := t.creds[key]; ok {
		return c, nil
	}
	if len(t.creds) >= maxTenants {
		return nil, fmt.Errorf("token for tenant %s: more than %d tenants", tenant, maxTenants)
	}
	c, err := t.newCred(tenant)
	if err != nil {
		return nil, err
	}
	t.creds[key] = c
	return c, nil
}

// CheckCertFile reads and parses a client certificate file as the client will (PEM, or PKCS#12
// decrypted with password), so that a configuration can be refused at start with its problem.
func CheckCertFile(path, password string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var pw []byte
	if password != "" {
		pw = []byte(password)
	}
	if _, _, err := azidentity.ParseCertificates(data, pw); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
