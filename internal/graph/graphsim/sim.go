package graphsim

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/big"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/google/uuid"
	"go.uber.org/zap"
)

// Options configure a simulator. TenantID, ClientID and ClientSecret are required.
type Options struct {
	// TenantID, ClientID and ClientSecret are the app registration the bot uses; token requests
	// must name this tenant and present this client and secret.
	TenantID, ClientID, ClientSecret string
	// WebhookURL is the bot's "Webhook (for calling)" URL, where `created` notifications of
	// incoming calls are posted. Required by PlaceCall.
	WebhookURL string
	// Issuer is the iss claim of callback tokens; default "https://api.botframework.com".
	Issuer string
	// PromptDuration is how long each prompt of a playPrompt plays; default 300ms.
	PromptDuration time.Duration
	// PromptDurations overrides PromptDuration for the prompts with these media URIs (hold
	// music that lasts minutes next to short menu prompts, say).
	PromptDurations map[string]time.Duration
	// PromptFailures makes the prompts with these media URIs fail, as media Graph cannot fetch
	// or play. PromptFailInResponse answers the playPrompt 200 with its playPromptOperation
	// already failed, and no notification follows (a final status in an action's response is
	// the outcome: https://learn.microsoft.com/en-us/graph/api/resources/commsoperation);
	// PromptFailNotified answers running and, when the operation's turn to play comes, notifies
	// it failed. Either way nothing plays.
	PromptFailures map[string]PromptFailure
	// StepDelay is the delay between a call's state notifications (establishing -> established,
	// transferring -> transferAccepted -> terminated...); default 20ms.
	StepDelay time.Duration
	// AnswerTimeout ends an incoming call that was not answered, rejected or redirected in time
	// (deleted, resultInfo 408/1106); default 15s.
	AnswerTimeout time.Duration
	// RingTimeout is how long an agent who does not answer rings before a transfer, redirect
	// or invite fails; default 5s.
	RingTimeout time.Duration
	// Logger receives debug lines about requests and notifications; default no logging.
	Logger *zap.Logger
	// NotifyClient posts notifications to the bot; default a client with a 5s timeout. The
	// simulator never follows redirects with it: it handles 302/307/308 itself.
	NotifyClient *http.Client
	// Addr is the address the HTTPS server listens on; default "127.0.0.1:0" (a free port on
	// loopback). The control API under /_sim/ has no authentication: bind to another interface
	// only where everyone who can reach it may drive the simulator.
	Addr string
	// Hostname is the host the simulator's URLs use; the server certificate names it besides
	// 127.0.0.1, ::1 and localhost. Default: the host of Addr, or 127.0.0.1 when Addr's host is
	// empty or unspecified (0.0.0.0, ::).
	Hostname string
	// Seed seeds the random decisions of fault rules that have a probability. 0 picks a random
	// seed; Seed() tells which, so a run can be repeated.
	Seed uint64
	// KeepAliveTimeout ends an answered call whose bot sent no keepAlive for that long
	// (deleted, resultInfo 408/8537); default 45 minutes, as documented.
	KeepAliveTimeout time.Duration
}

// PromptFailure says how a prompt of Options.PromptFailures fails.
type PromptFailure int

// Prompt failures.
const (
	// PromptFailInResponse: the playPrompt's response carries the failed operation; no
	// notification follows.
	PromptFailInResponse PromptFailure = iota + 1
	// PromptFailNotified: the response says running; a deleted operation notification says
	// failed when the operation's turn to play comes.
	PromptFailNotified
)

// FailPrompt makes the playPrompt requests sent from now on fail as f says for a prompt with this
// media URI (Options.PromptFailures); 0 plays it again. Operations queued already are not
// changed.
func (s *Sim) FailPrompt(uri string, f PromptFailure) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f == 0 {
		delete(s.opts.PromptFailures, uri)
		return
	}
	s.opts.PromptFailures[uri] = f
}

// Defaults applied by New to zero Options fields.
const (
	DefaultIssuer         = "https://api.botframework.com"
	DefaultPromptDuration = 300 * time.Millisecond
	DefaultStepDelay      = 20 * time.Millisecond
	DefaultAnswerTimeout  = 15 * time.Second
	DefaultRingTimeout    = 5 * time.Second
	DefaultDigitDelay     = 100 * time.Millisecond
	DefaultTalkTime       = 2 * time.Second
	DefaultAddr           = "127.0.0.1:0"
	DefaultKeepAlive      = 45 * time.Minute
)

// Errors returned by the caller-side API.
var (
	ErrClosed      = errors.New("graphsim: simulator closed")
	ErrCallEnded   = errors.New("graphsim: call has ended")
	ErrNotInCall   = errors.New("graphsim: call is not established")
	ErrNoWebhook   = errors.New("graphsim: Options.WebhookURL is not set")
	ErrInvalidSpec = errors.New("graphsim: invalid caller spec")
)

// Request is one HTTP request the simulator received.
type Request struct {
	Time      time.Time
	Method    string
	Path      string // URL path, without the query
	Query     string
	Header    http.Header
	Body      []byte // as sent, after removing any gzip content encoding
	Action    string // "answer", "transfer", "playPrompt", "invite", "get", "delete", "getPresencesByUserId", "token"...; "" when unrouted
	CallID    string // the call id as written in the path, "" when none
	RequestID string // the request-id header the simulator answered with
	Status    int    // the status the simulator answered with; 0 while the request is in flight
}

// Delivery is one attempt to post a notification to the bot.
type Delivery struct {
	Time        time.Time
	CallID      string
	URL         string
	Attempt     int // 1 for the first try, up to 4
	ChangeType  string
	ResourceURL string
	// State is the call state the notification carries ("established"...), the operation
	// status for operation notifications ("completed", "failed"), or "" (the bare deleted
	// after reject, and roster updates on /participants).
	State  string
	Header http.Header
	Body   []byte
	Status int    // the bot's status code; 0 when the request failed
	Err    string // transport error, if any
	// Fault is the injected fault that shaped this delivery: FaultDuplicate on the second
	// copy, FaultReorder on the notification held back, FaultBatch on each notification of a
	// request that carried several (they share Time, Body and Status) and on a batched one
	// posted alone, FaultExpiredToken or FaultUnpublishedKey; "" for none.
	Fault FaultKind
}

// Sim is a running simulator. All methods are safe for concurrent use.
type Sim struct {
	opts Options
	log  *zap.Logger

	caPEM    []byte
	caFile   string // the path last given to WriteCAFile
	tokenKey *rsa.PrivateKey
	tokenKid string
	seed     uint64

	url       string
	addr      string
	srv       *http.Server
	serveDone chan struct{}
	client    *http.Client
	notify    *http.Client
	ownNotify *http.Transport

	ctx    context.Context // cancelled by Close; bounds deliveries
	cancel context.CancelFunc
	wg     sync.WaitGroup // outbox goroutines
	// handlers counts requests being served; Add happens under mu while !closed.
	handlers sync.WaitGroup

	mu            sync.Mutex
	closed        bool
	timers        map[*time.Timer]struct{}
	calls         map[string]*call // by graph.CallKey
	order         []*call
	agents        map[string]*agent // by lower-case id
	presence      map[string]graph.Presence
	requests      []Request
	deliveries    []Delivery
	tokenRequests int
	faults        []*Fault
	faultSeq      uint64
	injectLog     []InjectedFault
	// Callback-token keys: signing signs notifications; published are what /botauth/keys
	// serves (signing first, then the key it replaced); pending is the key the next rollover
	// publishes, created when first needed.
	signing  *signingKey
	tokCache struct {
		kid, tok string
		sec      int64
	}
	published []*signingKey
	pending   *signingKey
}

// New generates a CA, a server certificate for 127.0.0.1, localhost and Options.Hostname, and
// the RSA keys that sign access and callback tokens, and starts serving HTTPS on Options.Addr
// (by default 127.0.0.1 on a free port).
func New(opts Options) (*Sim, error) {
	if opts.TenantID == "" || opts.ClientID == "" || opts.ClientSecret == "" {
		return nil, errors.New("graphsim: TenantID, ClientID and ClientSecret are required")
	}
	if opts.WebhookURL != "" {
		if err := checkURL(opts.WebhookURL); err != nil {
			return nil, fmt.Errorf("graphsim: webhook url: %w", err)
		}
	}
	if opts.Issuer == "" {
		opts.Issuer = DefaultIssuer
	}
	if opts.PromptDuration <= 0 {
		opts.PromptDuration = DefaultPromptDuration
	}
	if opts.StepDelay <= 0 {
		opts.StepDelay = DefaultStepDelay
	}
	if opts.AnswerTimeout <= 0 {
		opts.AnswerTimeout = DefaultAnswerTimeout
	}
	if opts.RingTimeout <= 0 {
		opts.RingTimeout = DefaultRingTimeout
	}
	if opts.KeepAliveTimeout <= 0 {
		opts.KeepAliveTimeout = DefaultKeepAlive
	}
	if opts.Addr == "" {
		opts.Addr = DefaultAddr
	}
	opts.PromptFailures = maps.Clone(opts.PromptFailures) // FailPrompt changes the simulator's copy
	if opts.PromptFailures == nil {
		opts.PromptFailures = map[string]PromptFailure{}
	}
	s := &Sim{
		opts:     opts,
		log:      opts.Logger,
		timers:   map[*time.Timer]struct{}{},
		calls:    map[string]*call{},
		agents:   map[string]*agent{},
		presence: map[string]graph.Presence{},
		seed:     opts.Seed,
	}
	for s.seed == 0 {
		s.seed = mrand.Uint64()
	}
	if s.log == nil {
		s.log = zap.NewNop()
	}
	s.log = s.log.With(zap.String("component", "graphsim"))

	ln, err := net.Listen("tcp", opts.Addr)
	if err != nil {
		return nil, fmt.Errorf("graphsim: listen: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = ln.Close()
		}
	}()
	host := urlHost(opts.Hostname, ln.Addr())
	caCert, caKey, caPEM, err := newCA()
	if err != nil {
		return nil, err
	}
	s.caPEM = caPEM
	serverCert, err := newServerCert(caCert, caKey, host)
	if err != nil {
		return nil, err
	}
	if s.tokenKey, s.tokenKid, err = newSigningKey(); err != nil {
		return nil, err
	}
	cb, err := newCallbackKey()
	if err != nil {
		return nil, err
	}
	s.signing, s.published = cb, []*signingKey{cb}

	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	ct := http.DefaultTransport.(*http.Transport).Clone()
	ct.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	s.client = &http.Client{Transport: ct, Timeout: 30 * time.Second}

	if opts.NotifyClient != nil {
		c := *opts.NotifyClient
		s.notify = &c
	} else {
		s.ownNotify = http.DefaultTransport.(*http.Transport).Clone()
		s.notify = &http.Client{Transport: s.ownNotify, Timeout: 5 * time.Second}
	}
	s.notify.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

	_, port, _ := net.SplitHostPort(ln.Addr().String())
	s.url = "https://" + net.JoinHostPort(host, port)
	s.addr = ln.Addr().String()
	// The server's own complaints (TLS handshakes from clients that do not trust the CA...)
	// are debug lines.
	errLog, err := zap.NewStdLogAt(s.log, zap.DebugLevel)
	if err != nil {
		return nil, fmt.Errorf("graphsim: logger: %w", err)
	}
	ok = true
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.srv = &http.Server{
		Handler:           s.routes(),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          errLog,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{serverCert}, MinVersion: tls.VersionTLS12},
	}
	s.serveDone = make(chan struct{})
	go func() {
		defer close(s.serveDone)
		if err := s.srv.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("serve", zap.Error(err))
		}
	}()
	s.log.Info("graphsim listening", zap.String("url", s.url), zap.String("addr", ln.Addr().String()),
		zap.String("tenant_id", opts.TenantID), zap.Uint64("seed", s.seed))
	return s, nil
}

// urlHost is the host of the simulator's URLs.
func urlHost(hostname string, addr net.Addr) string {
	if hostname != "" {
		return hostname
	}
	h, _, err := net.SplitHostPort(addr.String())
	if ip := net.ParseIP(h); err != nil || h == "" || (ip != nil && ip.IsUnspecified()) {
		return "127.0.0.1"
	}
	return h
}

// Seed is the seed of the fault rules' random decisions (Options.Seed, or the one picked).
func (s *Sim) Seed() uint64 { return s.seed }

// Addr is the address the server listens on (host:port).
func (s *Sim) Addr() string { return s.addr }

// URL is the server's base URL, https://127.0.0.1:PORT by default.
func (s *Sim) URL() string { return s.url }

// GraphURL is the Graph base URL to configure the SDK with: URL()+"/v1.0".
func (s *Sim) GraphURL() string { return s.url + "/v1.0" }

// AuthorityHost is the Entra ID authority host to give azidentity: URL()+"/".
func (s *Sim) AuthorityHost() string { return s.url + "/" }

// OpenIDConfigURL is the metadata document of the callback tokens' signing keys.
func (s *Sim) OpenIDConfigURL() string { return s.url + "/botauth/.well-known/OpenIdConfiguration" }

// CACertPEM returns the PEM of the CA that signed the server certificate.
func (s *Sim) CACertPEM() []byte { return bytes.Clone(s.caPEM) }

// WriteCAFile writes CACertPEM to path.
func (s *Sim) WriteCAFile(path string) error {
	if err := os.WriteFile(path, s.caPEM, 0o644); err != nil {
		return fmt.Errorf("graphsim: write ca file: %w", err)
	}
	s.mu.Lock()
	s.caFile = path
	s.mu.Unlock()
	return nil
}

// Client returns an HTTP client that trusts the simulator's CA.
func (s *Sim) Client() *http.Client { return s.client }

// Close stops the server, every timer and every delivery in flight, and waits for the
// simulator's goroutines to end. Calls still live stay as they are; their Done channels close.
// Calling it again does nothing. The error is always nil (Close satisfies io.Closer).
func (s *Sim) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for t := range s.timers {
		t.Stop()
	}
	clear(s.timers)
	s.mu.Unlock()

	s.cancel()
	// HTTP/2 connections linger for a second after GOAWAY: close our own client's first, give
	// the others a short grace, then cut them. Handlers still running are waited for below.
	s.client.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		_ = s.srv.Close()
	}
	<-s.serveDone
	s.handlers.Wait()
	s.wg.Wait()
	if s.ownNotify != nil {
		s.ownNotify.CloseIdleConnections()
	}
	return nil
}

// Requests returns every request received so far, in the order they arrived.
func (s *Sim) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Request, len(s.requests))
	for i, r := range s.requests {
		out[i] = r.clone()
	}
	return out
}

// RequestsFor returns the requests whose path names the call (any case, with or without
// hyphens), in order.
func (s *Sim) RequestsFor(callID string) []Request {
	key := graph.CallKey(callID)
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Request
	for _, r := range s.requests {
		if r.CallID != "" && graph.CallKey(r.CallID) == key {
			out = append(out, r.clone())
		}
	}
	return out
}

// Deliveries returns every notification delivery attempt so far, in order.
func (s *Sim) Deliveries() []Delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Delivery, len(s.deliveries))
	for i, d := range s.deliveries {
		d.Header = d.Header.Clone()
		d.Body = bytes.Clone(d.Body)
		out[i] = d
	}
	return out
}

// TokenRequests is the number of requests made to the token endpoint, successful or not.
func (s *Sim) TokenRequests() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tokenRequests
}

func (r Request) clone() Request {
	r.Header = r.Header.Clone()
	r.Body = bytes.Clone(r.Body)
	return r
}

// after runs f with s.mu held once d has passed, unless the simulator closes first. It must be
// called with s.mu held.
func (s *Sim) after(d time.Duration, f func()) *time.Timer {
	var t *time.Timer
	t = time.AfterFunc(d, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.closed {
			return
		}
		if _, ok := s.timers[t]; !ok {
			return // stopped by stopTimer while this function waited for the lock
		}
		delete(s.timers, t)
		f()
	})
	s.timers[t] = struct{}{}
	return t
}

// stopTimer stops a timer started by after. Called with s.mu held.
func (s *Sim) stopTimer(t *time.Timer) {
	if t != nil {
		t.Stop()
		delete(s.timers, t)
	}
}

// afterCall is after for work that only makes sense while the call lives.
func (s *Sim) afterCall(c *call, d time.Duration, f func()) *time.Timer {
	return s.after(d, func() {
		if !c.ended {
			f()
		}
	})
}

func checkURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return err
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("%q is not an absolute http(s) url", raw)
	}
	return nil
}

func newID() string { return uuid.NewString() }

// readBody reads a request body, undoing a gzip Content-Encoding (kiota compresses bodies).
func readBody(r *http.Request) ([]byte, error) {
	if r.Body == nil {
		return nil, nil
	}
	var rd io.Reader = io.LimitReader(r.Body, 4<<20)
	switch enc := strings.ToLower(r.Header.Get("Content-Encoding")); enc {
	case "", "identity":
	case "gzip":
		zr, err := gzip.NewReader(rd)
		if err != nil {
			return nil, fmt.Errorf("gzip body: %w", err)
		}
		defer zr.Close()
		rd = io.LimitReader(zr, 4<<20)
	default:
		return nil, fmt.Errorf("unsupported content encoding %q", enc)
	}
	return io.ReadAll(rd)
}

func newCA() (*x509.Certificate, *ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("graphsim: ca key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "graphsim test CA", Organization: []string{"callbot graphsim"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("graphsim: ca cert: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("graphsim: ca cert: %w", err)
	}
	return cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

func newServerCert(ca *x509.Certificate, caKey *ecdsa.PrivateKey, host string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("graphsim: server key: %w", err)
	}
	dnsNames := []string{"localhost"}
	ips := []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	if ip := net.ParseIP(host); ip != nil {
		if !slices.ContainsFunc(ips, ip.Equal) {
			ips = append(ips, ip)
		}
	} else if host != "localhost" {
		dnsNames = append(dnsNames, host)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		DNSNames:     dnsNames,
		IPAddresses:  ips,
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("graphsim: server cert: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return big.NewInt(time.Now().UnixNano())
	}
	return n
}
