package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/msgraph"
	"github.com/callbot/callbot/internal/ivr"
)

func runServe(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		return fmt.Errorf("%w: serve takes no arguments (configuration comes from CALLBOT_* variables)", errUsage)
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		return err
	}
	log := newLogger(stderr, cfg.LogLevel)
	defer log.Sync()

	flow, err := ivr.Load(cfg.FlowFile)
	if err != nil {
		return fmt.Errorf("CALLBOT_FLOW_FILE: %w", err)
	}
	ropts, _ := redisOptions(cfg.RedisURL)
	if ropts.TLSConfig != nil && cfg.CAFile != "" { // a Redis whose certificate a private CA signed
		if ropts.TLSConfig.RootCAs, err = caPool(cfg.CAFile); err != nil {
			return fmt.Errorf("CALLBOT_CA_FILE: %w", err)
		}
	}
	rdb := redis.NewUniversalClient(ropts)
	defer rdb.Close()
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err = rdb.Ping(pctx).Err()
	cancel()
	if err != nil {
		return fmt.Errorf("CALLBOT_REDIS_URL: redis unreachable: %w", err)
	}
	gc, err := msgraph.New(msgraph.Config{TenantID: cfg.TenantID, ClientID: cfg.ClientID, ClientSecret: cfg.ClientSecret,
		CertFile: cfg.CertFile, CertPassword: cfg.CertPassword,
		AuthorityHost: cfg.AuthorityHost, GraphURL: cfg.GraphURL, CAFile: cfg.CAFile, Logger: log.Named("graph")})
	if err != nil {
		return fmt.Errorf("graph client: %w", err)
	}
	hc, err := httpClientWithCA(cfg.CAFile)
	if err != nil {
		return fmt.Errorf("CALLBOT_CA_FILE: %w", err)
	}
	verifier, err := graph.NewVerifier(graph.VerifierConfig{OpenIDConfigURL: cfg.OpenIDConfigURL, Audience: cfg.ClientID,
		Issuers: cfg.Issuers, AllowedTenants: cfg.AllowedTenants, HTTPClient: hc})
	if err != nil {
		return err
	}
	b, err := newBot(ctx, botDeps{Redis: rdb, KeyPrefix: cfg.KeyPrefix, Graph: gc, Auth: verifier, Flow: flow,
		TenantID: cfg.TenantID, CallbackURI: cfg.PublicURL + "/api/calls/" + cfg.InstanceID, Instance: cfg.InstanceID,
		OutboxLease: cfg.OutboxLease, RedisReplicas: cfg.RedisReplicas, ReplicaTimeout: cfg.ReplicaTimeout,
		PresenceEvery: cfg.PresenceEvery, PresenceMaxAge: cfg.PresenceMaxAge, ReconcileEvery: cfg.ReconcileEvery, Log: log})
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		return fmt.Errorf("CALLBOT_LISTEN_ADDR: %w", err)
	}
	fmt.Fprintf(stdout, "callbot listening on %s (flow %q, %d queues, %d agents)\n", ln.Addr(), flow.Name, len(flow.Queues), len(flow.Agents()))
	log.Info("serving", zap.String("addr", ln.Addr().String()), zap.String("public_url", cfg.PublicURL))
	return b.serve(ctx, ln, cfg.ShutdownGrace)
}

func newLogger(w io.Writer, level string) *zap.Logger {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		lvl = zapcore.InfoLevel
	}
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	return zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.Lock(zapcore.AddSync(w)), lvl))
}

// httpClientWithCA trusts the system roots plus the CAs in file (if any).
func httpClientWithCA(file string) (*http.Client, error) {
	pool, err := caPool(file)
	if err != nil {
		return nil, err
	}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	return &http.Client{Transport: t, Timeout: 10 * time.Second}, nil
}

// caPool is the system's CAs and those of the PEM file, if any.
func caPool(file string) (*x509.CertPool, error) {
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	if file != "" {
		pem, err := os.ReadFile(file)
		if err != nil {
			return nil, err
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s holds no PEM certificate", file)
		}
	}
	return pool, nil
}
