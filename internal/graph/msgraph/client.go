// Package msgraph is callbot's outbound Microsoft Graph adapter: call control (answer, reject,
// redirect with simultaneous ring, blind and consultative transfer, playPrompt, recordResponse,
// tones, hold music, participants/invite, outbound calls, hang-up, keep-alive, get) and bulk
// presence reads, made with msgraph-sdk-go request builders over a kiota request adapter built
// here. Tokens come from a client secret or certificate, for the home tenant or, when
// multi-tenant, for the tenant named by graph.WithTenantID.
//
// It is the only package that imports msgraph-sdk-go, and it imports only the SDK's
// communications and models sub-packages: the root package costs minutes and gigabytes to build.
// Results are translated into the SDK-free vocabulary of package graph, and every failed Graph
// request becomes a *graph.Error.
//
// The SDK's default RetryHandler is left out of the middleware chain: it repeats POSTs on 503
// and 504, so a transfer that Graph did carry out could be sent twice, and an answer could wait
// past Graph's 15 s deadline (https://learn.microsoft.com/en-us/graph/api/call-answer). That
// handler (retry_handler.go in github.com/microsoft/kiota-http-go) retries a request whose body
// has a known length on 429, 503 and 504, up to 3 times, waiting Retry-After or 3 s doubling.
// Retries are decided here instead, per action (see RetryPolicyFor): idempotent actions are
// repeated after transient failures, the others only when Graph certainly did not act (429,
// request never sent).
// Callers reconcile ambiguous failures (graph.IsAmbiguous).
package msgraph

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	abs "github.com/microsoft/kiota-abstractions-go"
	absser "github.com/microsoft/kiota-abstractions-go/serialization"
	kiotaauth "github.com/microsoft/kiota-authentication-azure-go"
	khttp "github.com/microsoft/kiota-http-go"
	formser "github.com/microsoft/kiota-serialization-form-go"
	jsonser "github.com/microsoft/kiota-serialization-json-go"
	textser "github.com/microsoft/kiota-serialization-text-go"
	core "github.com/microsoftgraph/msgraph-sdk-go-core"
	"github.com/microsoftgraph/msgraph-sdk-go/communications"
	"go.uber.org/zap"
)

// Defaults applied by New to empty Config fields.
const (
	DefaultAuthorityHost = "https://login.microsoftonline.com/"
	DefaultGraphURL      = "https://graph.microsoft.com/v1.0"
	DefaultTimeout       = 10 * time.Second
)

// answerMargin is how much of Graph's 15 s answer deadline (graph.AnswerDeadline) callbot keeps
// for itself: an answer still in flight after 14 s is abandoned.
const answerMargin = time.Second

// graphScope is the app-only scope of the client-credentials token.
const graphScope = "https://graph.microsoft.com/.default"

// sdkVersion is reported by the SDK's telemetry middleware (SdkVersion header).
const sdkVersion = "1.89.0"

// Config configures a Client.
type Config struct {
	// TenantID and ClientID identify the bot's Entra ID app registration (home tenant).
	TenantID, ClientID string
	// ClientSecret authenticates the app with a secret. Exactly one of ClientSecret and CertFile
	// must be set.
	ClientSecret string
	// CertFile names a file holding the app's certificate and its private key (PEM, or PKCS#12
	// when CertPassword is set), used to sign client assertions instead of sending a secret.
	CertFile string
	// CertPassword decrypts a PKCS#12 CertFile; empty for an unencrypted PEM file.
	CertPassword string
	// MultiTenant makes a request whose context names another tenant (graph.WithTenantID) use a
	// token of that tenant; otherwise every request uses a token of TenantID.
	MultiTenant bool
	// AuthorityHost is the Entra ID authority, e.g. "https://login.microsoftonline.com/" (the
	// default), or a simulator's https URL in tests.
	AuthorityHost string
	// GraphURL is the Graph base URL, e.g. "https://graph.microsoft.com/v1.0" (the default).
	GraphURL string
	// CAFile optionally names a PEM file of CAs trusted in addition to the system roots, for
	// both the authority and Graph (a simulator's self-signed CA).
	CAFile string
	// Timeout bounds each action, retries and token acquisition included; default 10s. Answer
	// is further bounded by 14 s (see Client.Answer).
	Timeout time.Duration
	// Logger receives debug lines about each request and warnings about failed ones; nil means
	// no logging.
	Logger *zap.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Client performs Graph call-control and presence requests. It is safe for concurrent use.
// It satisfies callstate.CallControl and queue.PresenceSource.
type Client struct {
	comms   *communications.CommunicationsRequestBuilder
	adapter abs.RequestAdapter
	// callsURL is the Graph URL of the calls collection, ".../communications/calls".
	callsURL string
	timeout  time.Duration
	log      *zap.Logger
	now      func() time.Time
	// sleep waits d or until ctx ends; replaced in tests.
	sleep func(ctx context.Context, d time.Duration) error
	// jitter returns a random duration in [0, d); replaced in tests.
	jitter func(d time.Duration) time.Duration

	answerLatency *LatencyHistogram
	conns         *connCounter
	reach         reach // whether Graph is reached (Reach)
}

// New validates cfg and builds the token credential and the request adapter. It does no network
// I/O: the first token is fetched by the first request and cached (tokenCache) until it nears
// expiry. Errors name the Config field at fault.
func New(cfg Config) (*Client, error) {
	switch {
	case cfg.TenantID == "":
		return nil, errors.New("msgraph: Config.TenantID is required")
	case cfg.ClientID == "":
		return nil, errors.New("msgraph: Config.ClientID is required")
	case cfg.ClientSecret == "" && cfg.CertFile == "":
		return nil, errors.New("msgraph: set one of Config.ClientSecret and Config.CertFile")
	case cfg.ClientSecret != "" && cfg.CertFile != "":
		return nil, errors.New("msgraph: Config.ClientSecret and Config.CertFile are both set, set only one")
	case cfg.CertPassword != "" && cfg.CertFile == "":
		return nil, errors.New("msgraph: Config.CertPassword is set without Config.CertFile")
	}
	if cfg.AuthorityHost == "" {
		cfg.AuthorityHost = DefaultAuthorityHost
	}
	if cfg.GraphURL == "" {
		cfg.GraphURL = DefaultGraphURL
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if _, err := httpsURL("Config.AuthorityHost", cfg.AuthorityHost); err != nil {
		return nil, err
	}
	graphURL, err := httpsURL("Config.GraphURL", cfg.GraphURL)
	if err != nil {
		return nil, err
	}

	base, err := baseTransport(cfg.CAFile)
	if err != nil {
		return nil, err
	}
	newCred, err := credentialFactory(cfg, base)
	if err != nil {
		return nil, err
	}
	cred, err := newTenantCredentials(cfg.TenantID, cfg.MultiTenant, newCred, cfg.Now)
	if err != nil {
		return nil, err
	}
	conns := &connCounter{}
	// The bearer token is attached only to requests for the Graph host.
	auth, err := kiotaauth.NewAzureIdentityAuthenticationProviderWithScopesAndValidHosts(
		cred, []string{graphScope}, []string{graphURL.Hostname()})
	if err != nil {
		return nil, fmt.Errorf("msgraph: authentication provider: %w", err)
	}

	adapter, err := core.NewGraphRequestAdapterBaseWithParseNodeFactoryAndSerializationWriterFactoryAndHttpClient(
		auth,
		core.GraphClientOptions{GraphServiceLibraryVersion: sdkVersion},
		parseNodeFactories(), serializationWriterFactories(),
		graphHTTPClient(traceTransport{graphTransport(base, conns)}))
	if err != nil {
		return nil, fmt.Errorf("msgraph: request adapter: %w", err)
	}
	adapter.SetBaseUrl(strings.TrimRight(cfg.GraphURL, "/"))

	return &Client{
		// Built with empty path parameters so every child builder expands "{+baseurl}" from the
		// adapter; NewCommunicationsRequestBuilder(rawUrl) would pin all children to rawUrl.
		comms:         communications.NewCommunicationsRequestBuilderInternal(map[string]string{}, adapter),
		adapter:       adapter,
		callsURL:      strings.TrimRight(cfg.GraphURL, "/") + "/communications/calls",
		timeout:       cfg.Timeout,
		log:           cfg.Logger,
		now:           cfg.Now,
		sleep:         sleepCtx,
		jitter:        func(d time.Duration) time.Duration { return rand.N(d) },
		answerLatency: NewLatencyHistogram(AnswerLatencyBuckets...),
		conns:         conns,
	}, nil
}

// AnswerLatency is the histogram of successful answers' latency: from when callbot first saw
// the incoming call (graph.WithIncomingAt on the answer's context) or else from the start of
// Client.Answer, to Graph's 202.
func (c *Client) AnswerLatency() *LatencyHistogram { return c.answerLatency }

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func httpsURL(what, s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("msgraph: %s %q: %w", what, s, err)
	}
	if u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("msgraph: %s %q must be an absolute https URL", what, s)
	}
	return u, nil
}

// baseTransport is the network transport shared by the credential and the Graph pipeline: the
// default transport, trusting the system roots plus the CAs in caFile if given.
func baseTransport(caFile string) (*http.Transport, error) {
	t := http.DefaultTransport.(*http.Transport).Clone()
	if caFile == "" {
		return t, nil
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("msgraph: read ca file: %w", err)
	}
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("msgraph: ca file %s holds no PEM certificate", caFile)
	}
	t.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	return t, nil
}

// Connections of the Graph pipeline (see graphTransport).
const (
	// graphMaxIdleConns is how many idle connections to Graph are kept where HTTP/1.1 is
	// spoken (an egress proxy that does not offer HTTP/2): about as many as commands callbot
	// has in flight at its peak, so that a burst reuses connections instead of paying a TCP and
	// TLS handshake each (the default keeps 2).
	graphMaxIdleConns = 256
	// graphIdleConnTimeout closes a connection idle for that long, before Azure's load
	// balancers silently drop it (4 minutes).
	graphIdleConnTimeout = 90 * time.Second
)

// HTTP/2 health check of the Graph connections. Variables, so that a test can shorten them.
var (
	// graphPingAfter: a connection on which nothing was received for that long is sent a PING
	// (an idle one, or one whose requests wait; never one busy with answers). It was 3 s: with
	// 1 s, a path to Graph that silently drops is found 2 s sooner, and so is an instance cut
	// off from Graph (cmd/callbot's graphReach): in TestInstancePartitionedFromGraph/drop,
	// callers rang 3.9-4.1 s at most instead of 5.5-6.3 s. A PING a second on an idle
	// connection (closed after graphIdleConnTimeout) is nothing to Graph.
	graphPingAfter = time.Second
	// graphPingTimeout: a connection whose PING is not answered within that is closed; the
	// requests in flight on it fail (and are retried as RetryPolicy allows), later requests
	// open a new connection. Without it, a connection a NAT or load balancer silently dropped
	// would take every command for minutes, each failing only at its own deadline.
	graphPingTimeout = 2 * time.Second
)

// graphTransport is the transport of the Graph pipeline: base speaking HTTP/2 where the server
// offers it (Graph does) and HTTP/1.1 otherwise, with an HTTP/2 health check
// (graphPingAfter, graphPingTimeout) and a pool sized for concurrent HTTP/1.1 commands, its
// connections counted (GraphConnections). The credential keeps base.
//
// HTTP/2 was chosen by measurement against graphsim answering with a real Graph's latency
// (docs/performance-history.md, "Night of 2026-11-25: Graph's latency, and HTTP/2 again"): with HTTP/1.1 a request in flight holds a
// connection, so at 200 calls/s callbot kept 120-140 connections open with Graph answering in
// 100 ms and opened 1,121 (one per ten requests: beyond graphMaxIdleConns they are closed after
// use) with Graph answering in 1 s, the slow Graph a contact centre must ride out; NAT gateways
// and egress proxies count every one. HTTP/2 carried the same load on one connection (five at 1
// s: graphsim, as Go's server, allows 250 streams on each), at the same CPU with 100 ms and 10%
// less with 1 s. With a server answering at once (BenchmarkPlayPrompt, BenchmarkAnswer) the
// client's CPU per request is the same either way; only a request sent alone waits longer over
// HTTP/2 (14%, a fraction of a millisecond on loopback, nothing next to Graph's own latency).
func graphTransport(base *http.Transport, conns *connCounter) *http.Transport {
	t := base.Clone()
	dial := t.DialContext
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	t.DialContext = conns.dial(dial)
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetHTTP2(true)
	t.Protocols = &p
	t.HTTP2 = &http.HTTP2Config{SendPingTimeout: graphPingAfter, PingTimeout: graphPingTimeout}
	t.MaxIdleConns = graphMaxIdleConns
	t.MaxIdleConnsPerHost = graphMaxIdleConns
	t.IdleConnTimeout = graphIdleConnTimeout
	return t
}

// graphHTTPClient is the SDK's default client minus the middlewares that cost CPU on every
// request and do nothing for callbot (each starts an OpenTelemetry span and copies the request):
//
//   - RetryHandler: it repeats POSTs on 503 and 504 (see the package comment; retries are
//     decided in retry.go).
//   - CompressionHandler: call-control bodies are a few hundred bytes, and it re-sends a request
//     uncompressed after a 415, a second send callbot does not want for transfer.
//   - UrlReplaceHandler: it rewrites the path /users/me-token-to-replace to /me; callbot only
//     calls /communications/...
//   - ParametersNameDecodingHandler: it decodes percent-encoded query parameter names such as
//     %24select; callbot's requests carry no query string.
//   - HeadersInspectionHandler: it copies the headers into a HeadersInspectionOptions that a
//     request passes to read them; callbot passes none.
//   - UserAgentHandler: it formats the same User-Agent for every request; traceTransport sets
//     that value, computed once (userAgent), instead.
//
// What remains is GraphTelemetryHandler (the SdkVersion and client-request-id headers Graph
// support asks for) and RedirectHandler (it follows a redirect, should Graph send one).
//
// The client has no Timeout: every request carries its action's deadline in its context
// (Client.do), and an http.Client with a Timeout starts a goroutine and a timer per request to
// enforce its own, one more goroutine for each request in flight while Graph is slow.
func graphHTTPClient(base http.RoundTripper) *http.Client {
	opts := core.GraphClientOptions{GraphServiceLibraryVersion: sdkVersion}
	var chain []khttp.Middleware
	for _, m := range core.GetDefaultMiddlewaresWithOptions(&opts) {
		switch m.(type) {
		case *khttp.RetryHandler, *khttp.CompressionHandler, *khttp.UrlReplaceHandler,
			*khttp.ParametersNameDecodingHandler, *khttp.HeadersInspectionHandler, *khttp.UserAgentHandler:
			continue
		}
		chain = append(chain, m)
	}
	return &http.Client{
		Transport: khttp.NewCustomTransportWithParentTransport(base, chain...),
		// The RedirectHandler middleware follows redirects itself.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// userAgent is the User-Agent kiota's UserAgentHandler would set ("kiota-go/1.5.4").
var userAgent = func() string {
	o := khttp.NewUserAgentHandlerOptions()
	return o.GetProductName() + "/" + o.GetProductVersion()
}()

// parseNodeFactories and serializationWriterFactories register what the root package's
// NewGraphBaseServiceClient registers (JSON, text, form), in registries of our own instead of
// the process-wide defaults.
func parseNodeFactories() absser.ParseNodeFactory {
	r := absser.NewParseNodeFactoryRegistry()
	for _, f := range []absser.ParseNodeFactory{
		jsonser.NewJsonParseNodeFactory(), textser.NewTextParseNodeFactory(), formser.NewFormParseNodeFactory(),
	} {
		if ct, err := f.GetValidContentType(); err == nil {
			r.ContentTypeAssociatedFactories[ct] = f
		}
	}
	return r
}

func serializationWriterFactories() absser.SerializationWriterFactory {
	r := absser.NewSerializationWriterFactoryRegistry()
	for _, f := range []absser.SerializationWriterFactory{
		jsonser.NewJsonSerializationWriterFactory(), textser.NewTextSerializationWriterFactory(),
		formser.NewFormSerializationWriterFactory(),
	} {
		if ct, err := f.GetValidContentType(); err == nil {
			r.ContentTypeAssociatedFactories[ct] = f
		}
	}
	return r
}
