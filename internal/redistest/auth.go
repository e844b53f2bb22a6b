package redistest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// access is how a node is reached: the password it requires and TLS, as a managed Redis
// (Azure Cache for Redis, ElastiCache with in-transit encryption) wants both. The zero value is
// plain TCP without a password.
type access struct {
	password string
	tls      *tls.Config // trusts the test CA; nil without TLS
	caFile   string      // the test CA, PEM
	certFile string      // the nodes' certificate (127.0.0.1, localhost) and key, PEM
	keyFile  string
}

// options are go-redis options reaching addr.
func (a *access) options(addr string) *redis.Options {
	o := &redis.Options{Addr: addr}
	if a != nil {
		o.Password = a.password
		if a.tls != nil {
			o.TLSConfig = a.tls.Clone()
		}
	}
	return o
}

// serverArgs are the redis-server options of a node listening on port.
func (a *access) serverArgs(port int) []string {
	if a == nil || a.tls == nil {
		args := []string{"--port", strconv.Itoa(port)}
		if a != nil && a.password != "" {
			args = append(args, "--requirepass", a.password, "--masterauth", a.password)
		}
		return args
	}
	args := []string{"--port", "0", "--tls-port", strconv.Itoa(port), "--tls-cert-file", a.certFile,
		"--tls-key-file", a.keyFile, "--tls-ca-cert-file", a.caFile, "--tls-auth-clients", "no",
		"--tls-replication", "yes", "--tls-cluster", "yes"}
	if a.password != "" {
		args = append(args, "--requirepass", a.password, "--masterauth", a.password)
	}
	return args
}

// cliArgs are redis-cli's options reaching the nodes.
func (a *access) cliArgs() []string {
	var args []string
	if a == nil {
		return nil
	}
	if a.password != "" {
		args = append(args, "-a", a.password, "--no-auth-warning")
	}
	if a.tls != nil {
		args = append(args, "--tls", "--cacert", a.caFile)
	}
	return args
}

// newAccess makes the access of ClusterOptions: with TLS, a CA and a certificate for the loopback
// address written to dir.
func newAccess(o ClusterOptions, dir string) (*access, error) {
	a := &access{password: o.Password}
	if !o.TLS {
		return a, nil
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "redistest CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	// one certificate serves as the nodes' server and, for replication and the cluster bus, client
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "localhost"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), DNSNames: []string{"localhost"},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	a.caFile, a.certFile, a.keyFile = filepath.Join(dir, "ca.pem"), filepath.Join(dir, "node.pem"), filepath.Join(dir, "node-key.pem")
	for file, block := range map[string]*pem.Block{
		a.caFile:   {Type: "CERTIFICATE", Bytes: caDER},
		a.certFile: {Type: "CERTIFICATE", Bytes: leafDER},
		a.keyFile:  {Type: "EC PRIVATE KEY", Bytes: keyDER},
	} {
		if err := os.WriteFile(file, pem.EncodeToMemory(block), 0o600); err != nil {
			return nil, fmt.Errorf("write %s: %w", file, err)
		}
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	a.tls = &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
	return a, nil
}
