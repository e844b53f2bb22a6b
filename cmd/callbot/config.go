package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/msgraph"
)

// config is everything `callbot serve` reads from the environment.
type config struct {
	ListenAddr      string
	PublicURL       string
	TenantID        string
	ClientID        string
	ClientSecret    string
	CertFile        string
	CertPassword    string
	AuthorityHost   string
	GraphURL        string
	OpenIDConfigURL string
	Issuers         []string
	AllowedTenants  []string
	CAFile          string
	RedisURL        string
	FlowFile        string
	KeyPrefix       string
	PresenceEvery   time.Duration
	PresenceMaxAge  time.Duration
	ReconcileEvery  time.Duration
	ShutdownGrace   time.Duration
	OutboxLease     time.Duration
	RedisReplicas   int
	ReplicaTimeout  time.Duration
	InstanceID      string
	LogLevel        string
}

// The environment variables, with their defaults, in the order the README lists them.
var envVars = []struct{ name, def, help string }{
	{"CALLBOT_LISTEN_ADDR", ":8080", "address the HTTP server listens on"},
	{"CALLBOT_PUBLIC_URL", "", "https base URL Graph reaches callbot at; callbackUri is CALLBOT_PUBLIC_URL/api/calls/<instance> (required)"},
	{"CALLBOT_TENANT_ID", "", "Entra tenant id (GUID) of the app registration (required)"},
	{"CALLBOT_CLIENT_ID", "", "application (client) id of the bot (required)"},
	{"CALLBOT_CLIENT_SECRET", "", "client secret of the app registration (this or CALLBOT_CLIENT_CERT_FILE)"},
	{"CALLBOT_CLIENT_CERT_FILE", "", "certificate and private key of the app registration, PEM (or PKCS#12 with CALLBOT_CLIENT_CERT_PASSWORD), instead of a secret"},
	{"CALLBOT_CLIENT_CERT_PASSWORD", "", "password of a PKCS#12 CALLBOT_CLIENT_CERT_FILE"},
	{"CALLBOT_AUTHORITY_HOST", "https://login.microsoftonline.com/", "Entra authority host"},
	{"CALLBOT_GRAPH_URL", "https://graph.microsoft.com/v1.0", "Microsoft Graph base URL"},
	{"CALLBOT_OPENID_CONFIG_URL", graph.DefaultOpenIDConfigURL, "OpenID metadata of the keys that sign Graph's callback tokens"},
	{"CALLBOT_TOKEN_ISSUERS", strings.Join(graph.DefaultIssuers, ","), "comma-separated issuers accepted on callback tokens"},
	{"CALLBOT_ALLOWED_TENANTS", "", "comma-separated tenant ids accepted on callback tokens (default: CALLBOT_TENANT_ID); callbot serves one tenant per deployment, so none but CALLBOT_TENANT_ID is accepted here yet"},
	{"CALLBOT_CA_FILE", "", "PEM file of extra CAs to trust for Graph, the authority, the OpenID metadata and Redis over TLS"},
	{"CALLBOT_REDIS_URL", "", "redis://[user:pass@]host:port/db, rediss://... (TLS), sentinel://[:pass@]host:port,host:port/master[?db=N], rediss-sentinel://... (TLS), redis-cluster://[user:pass@]host:port,host:port, rediss-cluster://... (TLS), or a comma-separated list of cluster node addresses (required)"},
	{"CALLBOT_REDIS_REPLICAS", "0", "replicas that must have a call's change before callbot acknowledges the notification behind it (Redis WAIT), so a failover cannot lose it; 0 waits for none. Standalone with replicas, Sentinel, or Cluster (each master a change writes to waits for its own replicas)"},
	{"CALLBOT_REDIS_REPLICA_TIMEOUT", "100ms", "how long a change waits for CALLBOT_REDIS_REPLICAS; past it the notification is refused (503) and delivered again"},
	{"CALLBOT_FLOW_FILE", "", "path of the IVR flow file (required)"},
	{"CALLBOT_KEY_PREFIX", "cb", "prefix of every Redis key (no braces)"},
	{"CALLBOT_PRESENCE_INTERVAL", "5s", "how often agents' Teams presence is polled"},
	{"CALLBOT_PRESENCE_MAX_AGE", "30s", "how old a presence reading routing goes by: an agent whose presence Graph has not given for longer (throttled, failing, permission withdrawn) is offered no caller until it does; at least CALLBOT_PRESENCE_INTERVAL (default: 30s or 3 intervals, the longer); 0 routes on the last reading however old"},
	{"CALLBOT_RECONCILE_INTERVAL", "5m", "how often the reconciler checks every live call with Graph (closes those Graph no longer has, keeps calls older than 15 minutes alive), from 10s to 10m; one instance does it, by lease"},
	{"CALLBOT_SHUTDOWN_GRACE", "20s", "the most a shutdown on SIGTERM takes; past it what is unfinished is left in Redis and callbot exits with code 1"},
	{"CALLBOT_OUTBOX_LEASE", "8s", "how long an instance that stopped renewing it (it died) keeps the commands it saved before another instance re-drives them (at most 12s)"},
	{"CALLBOT_INSTANCE_ID", "", "name of this instance, put in callback URIs as an affinity hint (default: the host name)"},
	{"CALLBOT_LOG_LEVEL", "info", "debug, info, warn or error"},
}

// loadConfig reads and validates the environment. Every problem is reported, each naming its
// variable.
func loadConfig(getenv func(string) string) (config, error) {
	get := func(name string) string {
		if v := strings.TrimSpace(getenv(name)); v != "" {
			return v
		}
		for _, e := range envVars {
			if e.name == name {
				return e.def
			}
		}
		return ""
	}
	var errs []error
	bad := func(name, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", name, fmt.Sprintf(format, args...)))
	}
	c := config{
		ListenAddr: get("CALLBOT_LISTEN_ADDR"), PublicURL: strings.TrimRight(get("CALLBOT_PUBLIC_URL"), "/"),
		TenantID: get("CALLBOT_TENANT_ID"), ClientID: get("CALLBOT_CLIENT_ID"), ClientSecret: get("CALLBOT_CLIENT_SECRET"),
		CertFile: get("CALLBOT_CLIENT_CERT_FILE"), CertPassword: get("CALLBOT_CLIENT_CERT_PASSWORD"),
		AuthorityHost: get("CALLBOT_AUTHORITY_HOST"), GraphURL: strings.TrimRight(get("CALLBOT_GRAPH_URL"), "/"),
		OpenIDConfigURL: get("CALLBOT_OPENID_CONFIG_URL"), CAFile: get("CALLBOT_CA_FILE"), RedisURL: get("CALLBOT_REDIS_URL"),
		FlowFile: get("CALLBOT_FLOW_FILE"), KeyPrefix: get("CALLBOT_KEY_PREFIX"), LogLevel: get("CALLBOT_LOG_LEVEL"),
		Issuers: splitList(get("CALLBOT_TOKEN_ISSUERS")), AllowedTenants: splitList(get("CALLBOT_ALLOWED_TENANTS")),
	}
	for _, name := range []string{"CALLBOT_PUBLIC_URL", "CALLBOT_TENANT_ID", "CALLBOT_CLIENT_ID", "CALLBOT_REDIS_URL", "CALLBOT_FLOW_FILE"} {
		if get(name) == "" {
			bad(name, "is required")
		}
	}
	switch {
	case c.ClientSecret == "" && c.CertFile == "":
		bad("CALLBOT_CLIENT_SECRET", "is required (or CALLBOT_CLIENT_CERT_FILE)")
	case c.ClientSecret != "" && c.CertFile != "":
		bad("CALLBOT_CLIENT_CERT_FILE", "set together with CALLBOT_CLIENT_SECRET: use one")
	case c.CertFile != "":
		if err := msgraph.CheckCertFile(c.CertFile, c.CertPassword); err != nil {
			bad("CALLBOT_CLIENT_CERT_FILE", "%v", err)
		}
	}
	if c.CertPassword != "" && c.CertFile == "" {
		bad("CALLBOT_CLIENT_CERT_PASSWORD", "set without CALLBOT_CLIENT_CERT_FILE")
	}
	if _, port, err := net.SplitHostPort(c.ListenAddr); err != nil {
		bad("CALLBOT_LISTEN_ADDR", "%q is not host:port", c.ListenAddr)
	} else if _, err := net.LookupPort("tcp", port); err != nil {
		// refused here, before callbot writes anything to Redis, not when it listens
		bad("CALLBOT_LISTEN_ADDR", "%q: %v", c.ListenAddr, err)
	}
	if c.PublicURL != "" {
		if err := checkPublicURL(c.PublicURL); err != nil {
			bad("CALLBOT_PUBLIC_URL", "%v", err)
		}
	}
	for _, v := range []struct{ name, val string }{{"CALLBOT_AUTHORITY_HOST", c.AuthorityHost}, {"CALLBOT_GRAPH_URL", c.GraphURL}, {"CALLBOT_OPENID_CONFIG_URL", c.OpenIDConfigURL}} {
		if u, err := url.Parse(v.val); err != nil || u.Scheme != "https" || u.Host == "" {
			bad(v.name, "%q is not an https URL", v.val)
		}
	}
	if c.TenantID != "" && !isGUID(c.TenantID) {
		bad("CALLBOT_TENANT_ID", "%q is not a GUID", c.TenantID)
	}
	if c.ClientID != "" && !isGUID(c.ClientID) {
		bad("CALLBOT_CLIENT_ID", "%q is not a GUID", c.ClientID)
	}
	for _, t := range c.AllowedTenants {
		if !isGUID(t) {
			bad("CALLBOT_ALLOWED_TENANTS", "%q is not a GUID", t)
		}
	}
	// Graph writes these GUIDs in lower case (tid and aud of its tokens, tenantId of its calls),
	// and they are compared as strings: a GUID written in capitals is the same one.
	c.TenantID, c.ClientID = strings.ToLower(c.TenantID), strings.ToLower(c.ClientID)
	for i, t := range c.AllowedTenants {
		c.AllowedTenants[i] = strings.ToLower(t)
	}
	if len(c.AllowedTenants) == 0 && c.TenantID != "" {
		c.AllowedTenants = []string{c.TenantID}
	}
	for _, t := range c.AllowedTenants {
		if isGUID(t) && c.TenantID != "" && t != c.TenantID {
			// Queues, agents, presence and the reconciler are CALLBOT_TENANT_ID's alone: a call of
			// another tenant would be answered and then wait in a queue no dispatcher serves.
			bad("CALLBOT_ALLOWED_TENANTS", "%q is not CALLBOT_TENANT_ID: callbot serves one tenant per deployment (a call of another tenant would wait in a queue nobody serves)", t)
		}
	}
	if len(c.Issuers) == 0 {
		bad("CALLBOT_TOKEN_ISSUERS", "no issuer given")
	}
	if c.CAFile != "" {
		if pem, err := os.ReadFile(c.CAFile); err != nil {
			bad("CALLBOT_CA_FILE", "%v", err)
		} else if !x509.NewCertPool().AppendCertsFromPEM(pem) {
			bad("CALLBOT_CA_FILE", "%s holds no PEM certificate", c.CAFile)
		}
	}
	var err error
	if c.RedisReplicas, err = strconv.Atoi(get("CALLBOT_REDIS_REPLICAS")); err != nil || c.RedisReplicas < 0 || c.RedisReplicas > 16 {
		bad("CALLBOT_REDIS_REPLICAS", "%q is not a number from 0 to 16", get("CALLBOT_REDIS_REPLICAS"))
	}
	if c.ReplicaTimeout, err = time.ParseDuration(get("CALLBOT_REDIS_REPLICA_TIMEOUT")); err != nil || c.ReplicaTimeout < time.Millisecond || c.ReplicaTimeout > 2*time.Second {
		bad("CALLBOT_REDIS_REPLICA_TIMEOUT", "%q is not a duration from 1ms to 2s", get("CALLBOT_REDIS_REPLICA_TIMEOUT"))
	}
	if c.RedisURL != "" {
		if _, err := redisOptions(c.RedisURL); err != nil {
			bad("CALLBOT_REDIS_URL", "%v", err)
		}
	}
	if c.PresenceEvery, err = time.ParseDuration(get("CALLBOT_PRESENCE_INTERVAL")); err != nil || c.PresenceEvery < 500*time.Millisecond {
		bad("CALLBOT_PRESENCE_INTERVAL", "%q is not a duration of at least 500ms", get("CALLBOT_PRESENCE_INTERVAL"))
	}
	if v := strings.TrimSpace(getenv("CALLBOT_PRESENCE_MAX_AGE")); v == "" {
		c.PresenceMaxAge = max(30*time.Second, 3*c.PresenceEvery)
	} else if c.PresenceMaxAge, err = time.ParseDuration(v); err != nil || c.PresenceMaxAge < 0 ||
		(c.PresenceMaxAge > 0 && c.PresenceMaxAge < c.PresenceEvery) {
		bad("CALLBOT_PRESENCE_MAX_AGE", "%q is not 0 nor a duration of at least CALLBOT_PRESENCE_INTERVAL (%v)", v, c.PresenceEvery)
	}
	if c.ReconcileEvery, err = time.ParseDuration(get("CALLBOT_RECONCILE_INTERVAL")); err != nil || c.ReconcileEvery < 10*time.Second || c.ReconcileEvery > maxReconcileEvery {
		bad("CALLBOT_RECONCILE_INTERVAL", "%q is not a duration from 10s to %v (Graph ends a call that had no keepAlive for 45 minutes; callbot sends the first at 15 minutes, so two passes fit before that, one of them failing)", get("CALLBOT_RECONCILE_INTERVAL"), maxReconcileEvery)
	}
	if c.ShutdownGrace, err = time.ParseDuration(get("CALLBOT_SHUTDOWN_GRACE")); err != nil || c.ShutdownGrace <= 0 {
		bad("CALLBOT_SHUTDOWN_GRACE", "%q is not a positive duration", get("CALLBOT_SHUTDOWN_GRACE"))
	}
	if c.OutboxLease, err = time.ParseDuration(get("CALLBOT_OUTBOX_LEASE")); err != nil || c.OutboxLease < time.Second || c.OutboxLease > maxOutboxLease {
		// Longer, an answer a dead instance had saved would be re-driven after Graph's 15 s
		// answer deadline: the caller would be dropped.
		bad("CALLBOT_OUTBOX_LEASE", "%q is not a duration from 1s to %v (a dead instance's answer is re-driven a lease after it was saved, then read and sent: within Graph's 15 s answer deadline)", get("CALLBOT_OUTBOX_LEASE"), maxOutboxLease)
	}
	if strings.ContainsAny(c.KeyPrefix, "{}") || c.KeyPrefix == "" || strings.TrimSpace(c.KeyPrefix) != c.KeyPrefix {
		// callbot's keys carry their own hash tags ({call:K}, {tenant:T}): a brace in the prefix
		// would make Redis Cluster hash another part of the key, and a script's keys fall apart
		bad("CALLBOT_KEY_PREFIX", "%q must be non-empty, without braces or surrounding spaces", c.KeyPrefix)
	}
	c.InstanceID = get("CALLBOT_INSTANCE_ID")
	if c.InstanceID == "" {
		c.InstanceID, _ = os.Hostname()
	}
	if !validInstanceID(c.InstanceID) {
		bad("CALLBOT_INSTANCE_ID", "%q must be 1-63 letters, digits, '-' or '_'", c.InstanceID)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("CALLBOT_LOG_LEVEL", "%q is not debug, info, warn or error", c.LogLevel)
	}
	if len(errs) > 0 {
		return c, fmt.Errorf("configuration:\n  %w", joinIndented(errs))
	}
	return c, nil
}

func joinIndented(errs []error) error {
	s := make([]string, len(errs))
	for i, e := range errs {
		s[i] = e.Error()
	}
	return errors.New(strings.Join(s, "\n  "))
}

func validInstanceID(s string) bool {
	if s == "" || len(s) > 63 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func isGUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, r := range s {
		switch i {
		case 8, 13, 18, 23:
			if r != '-' {
				return false
			}
		default:
			if !strings.ContainsRune("0123456789abcdefABCDEF", r) {
				return false
			}
		}
	}
	return true
}

// maxOutboxLease bounds CALLBOT_OUTBOX_LEASE: Graph ends an incoming call not answered within
// 15 s, and an answer a dead instance saved waits out the lease, then up to a claim tick (a
// quarter lease, 1 s at most), a read of the call and the answer request, before it is sent.
const maxOutboxLease = 12 * time.Second

// maxReconcileEvery bounds CALLBOT_RECONCILE_INTERVAL: a call gets its first keepAlive on the
// first pass after it is 15 minutes old, and Graph ends one that had none for 45 minutes; at 10
// minutes apart, two more passes come before that, should the first keepAlive fail.
const maxReconcileEvery = 10 * time.Minute

// checkPublicURL: Graph only calls https callback URIs; plain http is accepted for loopback
// hosts so a local simulator can reach callbot.
func checkPublicURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%q is not an absolute URL", s)
	}
	if strings.ContainsAny(s, "?#") { // even empty: callbot appends /api/calls/<instance> to it
		return fmt.Errorf("%q must not have a query or fragment", s)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if ip := net.ParseIP(u.Hostname()); (ip != nil && ip.IsLoopback()) || u.Hostname() == "localhost" {
			return nil
		}
	}
	return fmt.Errorf("%q must be https (Graph only calls https callback URIs)", s)
}

// redisOptions understands a redis:// or rediss:// URL (standalone), a sentinel:// URL, a
// redis-cluster:// or rediss-cluster:// URL and a comma-separated list of host:port addresses
// (Redis Cluster).
func redisOptions(s string) (*redis.UniversalOptions, error) {
	if strings.HasPrefix(s, "unix://") {
		return nil, errors.New("unix sockets are not supported; use redis://host:port")
	}
	if rest, ok := strings.CutPrefix(s, "sentinel://"); ok {
		return sentinelOptions(rest, false)
	}
	if rest, ok := strings.CutPrefix(s, "rediss-sentinel://"); ok {
		return sentinelOptions(rest, true)
	}
	if rest, ok := strings.CutPrefix(s, "redis-cluster://"); ok {
		return clusterOptions(rest, false)
	}
	if rest, ok := strings.CutPrefix(s, "rediss-cluster://"); ok {
		return clusterOptions(rest, true)
	}
	if strings.HasPrefix(s, "redis://") || strings.HasPrefix(s, "rediss://") {
		o, err := redis.ParseURL(s)
		if err != nil {
			return nil, err
		}
		return &redis.UniversalOptions{Addrs: []string{o.Addr}, Username: o.Username, Password: o.Password,
			DB: o.DB, TLSConfig: o.TLSConfig}, nil
	}
	addrs := splitList(s)
	for _, a := range addrs {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return nil, fmt.Errorf("%q is neither a redis:// URL nor a list of host:port", s)
		}
	}
	if len(addrs) == 0 {
		return nil, errors.New("no address")
	}
	return &redis.UniversalOptions{Addrs: addrs, IsClusterMode: true}, nil
}

// clusterOptions reads "[[user]:password@]host:port[,host:port...]" of a redis-cluster:// URL
// (over TLS with tlsOn: rediss-cluster://): the nodes that seed the cluster client, and the
// credentials every node wants, percent-encoded as in a redis:// URL. Managed clusters (Azure
// Cache for Redis with clustering, ElastiCache in cluster mode) want both a password and TLS;
// the list form has neither.
func clusterOptions(s string, tlsOn bool) (*redis.UniversalOptions, error) {
	o := &redis.UniversalOptions{IsClusterMode: true}
	if at := strings.LastIndex(s, "@"); at >= 0 {
		user, pass, hasPass := strings.Cut(s[:at], ":")
		var err error
		if o.Username, err = url.PathUnescape(user); err != nil {
			return nil, fmt.Errorf("cluster URL user: %v", err)
		}
		if !hasPass { // redis://secret@host: the password alone, as go-redis reads it
			o.Username, o.Password = "", o.Username
		} else if o.Password, err = url.PathUnescape(pass); err != nil {
			return nil, fmt.Errorf("cluster URL password: %v", err)
		}
		s = s[at+1:]
	}
	if strings.ContainsAny(s, "?/") {
		return nil, errors.New("a cluster URL takes no database and no parameter: redis-cluster://[user:pass@]host:port,host:port")
	}
	o.Addrs = splitList(s)
	if len(o.Addrs) == 0 {
		return nil, errors.New("no cluster node address")
	}
	for _, a := range o.Addrs {
		if _, port, err := net.SplitHostPort(a); err != nil || port == "" {
			return nil, fmt.Errorf("cluster node address %q is not host:port", a)
		}
	}
	if tlsOn {
		// Every node is checked against the first address's host name: managed clusters report
		// their nodes by IP address, and their certificate names the cluster's endpoint.
		host, _, _ := net.SplitHostPort(o.Addrs[0])
		o.TLSConfig = &tls.Config{ServerName: host, MinVersion: tls.VersionTLS12}
	}
	return o, nil
}

// sentinelOptions reads "[:password@]host:port[,host:port...]/master[?db=N]": the Sentinels'
// addresses and the name of the master they watch. With tlsOn (rediss-sentinel://) the
// Sentinels, the master and the replicas are all reached over TLS, each connection's
// certificate checked against the address it dials: a Sentinel's as the URL names it, a node's
// as the Sentinels announce it (an IP address, or a name with `sentinel announce-hostnames
// yes`). go-redis has one TLS configuration for both.
func sentinelOptions(s string, tlsOn bool) (*redis.UniversalOptions, error) {
	o := &redis.UniversalOptions{}
	if tlsOn {
		o.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	s, query, _ := strings.Cut(s, "?") // a sentinel_password may hold an @
	if at := strings.LastIndex(s, "@"); at >= 0 {
		// percent-encoded as in a redis:// URL, so that a password may hold any character
		pw, err := url.PathUnescape(strings.TrimPrefix(s[:at], ":"))
		if err != nil {
			return nil, fmt.Errorf("sentinel URL password: %v", err)
		}
		o.Password = pw
		s = s[at+1:]
	}
	hosts, master, ok := strings.Cut(s, "/")
	if !ok || master == "" {
		return nil, errors.New("sentinel URL needs the master name: sentinel://host:port,host:port/master (rediss-sentinel:// over TLS)")
	}
	o.MasterName = master
	if query != "" {
		q, err := url.ParseQuery(query)
		if err != nil {
			return nil, err
		}
		for k := range q {
			if k != "db" && k != "sentinel_password" {
				return nil, fmt.Errorf("unknown sentinel URL parameter %q (db, sentinel_password)", k)
			}
		}
		if db := q.Get("db"); db != "" {
			n, err := strconv.Atoi(db)
			if err != nil || n < 0 {
				return nil, fmt.Errorf("db %q is not a database number", db)
			}
			o.DB = n
		}
		// The password before @ is the data nodes'; Sentinels with a requirepass of their own
		// need theirs too.
		o.SentinelPassword = q.Get("sentinel_password")
	}
	o.Addrs = splitList(hosts)
	for _, a := range o.Addrs {
		if _, _, err := net.SplitHostPort(a); err != nil {
			return nil, fmt.Errorf("sentinel address %q is not host:port", a)
		}
	}
	if len(o.Addrs) == 0 {
		return nil, errors.New("no sentinel address")
	}
	return o, nil
}
