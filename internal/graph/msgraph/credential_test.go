package msgraph_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/msgraph"
)

// selfSignedCert writes a PEM file holding a new self-signed certificate and its PKCS#8 RSA key.
func selfSignedCert(t *testing.T) (*x509.Certificate, string) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "callbot test app"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	data := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8})...)
	path := filepath.Join(t.TempDir(), "app.pem")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return cert, path
}

func TestCertificateCredential(t *testing.T) {
	f := newFakeGraph(t)
	cert, path := selfSignedCert(t)
	f.cert = cert
	c := newClientCfg(t, f, func(cfg *msgraph.Config) { cfg.ClientSecret = ""; cfg.CertFile = path })
	for range 2 {
		if err := c.KeepAlive(context.Background(), callID); err != nil {
			t.Fatal(err)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.assertions) != 1 || f.tokens != 1 {
		t.Fatalf("%d assertions accepted, %d tokens issued; want 1 each (cached)", len(f.assertions), f.tokens)
	}
	h := f.assertions[0]
	if h["alg"] != "PS256" || h["x5t#S256"] == nil {
		t.Errorf("assertion header %v, want alg PS256 with an x5t#S256 thumbprint", h)
	}
	if want := f.srv.URL + "/" + tenantID + "/oauth2/v2.0/token"; h["aud"] != want {
		t.Errorf("assertion audience %v, want %s", h["aud"], want)
	}
	if r := f.graph[0]; r.Header.Get("Authorization") != "Bearer "+accessToken {
		t.Errorf("Graph got %q", r.Header.Get("Authorization"))
	}
}

func TestMultiTenantTokens(t *testing.T) {
	const (
		tenantB = "0c5a3b1e-6f2d-4e8a-9b7c-1d2e3f4a5b6c"
		tenantC = "contoso.onmicrosoft.com"
	)
	f := newFakeGraph(t)
	c := newClientCfg(t, f, func(cfg *msgraph.Config) { cfg.MultiTenant = true })
	var want []string
	for range 2 {
		for _, tenant := range []string{"", tenantB, tenantC, tenantID, strings.ToUpper(tenantB)} {
			ctx := graph.WithTenantID(context.Background(), tenant)
			if err := c.KeepAlive(ctx, callID); err != nil {
				t.Fatalf("tenant %q: %v", tenant, err)
			}
			switch tenant {
			case "":
				tenant = tenantID
			case strings.ToUpper(tenantB):
				tenant = tenantB
			}
			want = append(want, tenant)
		}
	}
	var got []string
	for _, r := range f.requests() {
		got = append(got, r.Tenant)
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("tenants of the tokens Graph saw (-got +want):\n%s", diff)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if diff := cmp.Diff(f.tokensBy, map[string]int{tenantID: 1, tenantB: 1, tenantC: 1}); diff != "" {
		t.Errorf("token requests by tenant path (-got +want):\n%s", diff)
	}
}

func TestSingleTenantIgnoresContextTenant(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	ctx := graph.WithTenantID(context.Background(), "0c5a3b1e-6f2d-4e8a-9b7c-1d2e3f4a5b6c")
	if err := c.KeepAlive(ctx, callID); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if diff := cmp.Diff(f.tokensBy, map[string]int{tenantID: 1}); diff != "" {
		t.Errorf("token requests by tenant (-got +want):\n%s", diff)
	}
}

func TestDocumentedTokenResponse(t *testing.T) {
	f := newFakeGraph(t)
	f.tokenBody = payload(t, "response-token-client-credentials.json")
	c := newClient(t, f)
	if err := c.KeepAlive(context.Background(), callID); err != nil {
		t.Fatal(err)
	}
	want := "Bearer eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiIsIng1dCI6Ik1uQ19WWmNBVGZNNXBP..."
	if got := f.requests()[0].Header.Get("Authorization"); got != want {
		t.Errorf("Authorization = %q, want %q", got, want)
	}
}

func TestNewCredentialConfigErrors(t *testing.T) {
	_, certFile := selfSignedCert(t)
	garbage := filepath.Join(t.TempDir(), "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := msgraph.Config{TenantID: tenantID, ClientID: clientID}
	for name, tc := range map[string]struct {
		mutate func(*msgraph.Config)
		want   []string // substrings of the error; nil for success
	}{
		"secret":         {mutate: func(c *msgraph.Config) { c.ClientSecret = "s" }},
		"certificate":    {mutate: func(c *msgraph.Config) { c.CertFile = certFile }},
		"neither":        {mutate: func(*msgraph.Config) {}, want: []string{"Config.ClientSecret", "Config.CertFile"}},
		"both":           {mutate: func(c *msgraph.Config) { c.ClientSecret = "s"; c.CertFile = certFile }, want: []string{"Config.ClientSecret", "Config.CertFile"}},
		"missing file":   {mutate: func(c *msgraph.Config) { c.CertFile = certFile + ".none" }, want: []string{"Config.CertFile"}},
		"not a cert":     {mutate: func(c *msgraph.Config) { c.CertFile = garbage }, want: []string{"Config.CertFile"}},
		"password alone": {mutate: func(c *msgraph.Config) { c.ClientSecret = "s"; c.CertPassword = "p" }, want: []string{"Config.CertPassword"}},
		"no tenant":      {mutate: func(c *msgraph.Config) { c.ClientSecret = "s"; c.TenantID = "" }, want: []string{"Config.TenantID"}},
		"no client":      {mutate: func(c *msgraph.Config) { c.ClientSecret = "s"; c.ClientID = "" }, want: []string{"Config.ClientID"}},
	} {
		cfg := base
		tc.mutate(&cfg)
		_, err := msgraph.New(cfg)
		if tc.want == nil {
			if err != nil {
				t.Errorf("%s: %v", name, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("%s: New accepted %+v", name, cfg)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not name %s", name, err, w)
			}
		}
	}
}
