package daemon

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// selfSigned writes a certificate and key for 127.0.0.1 into dir.
func selfSigned(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ktel-test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600)
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// serve runs a daemon without probes on a free loopback port.
func serve(t *testing.T, webConfig string, maxScrapes int) (*Daemon, string) {
	t.Helper()
	cfg := testConfig("", false)
	cfg.ListenAddress = freeAddr(t)
	cfg.WebConfigFile = webConfig
	cfg.MaxScrapes = maxScrapes
	d, err := newDaemon(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	ln, err := Listen(cfg)
	if err != nil {
		t.Fatal(err)
	}
	go func() { done <- d.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
		d.Close()
	})
	return d, cfg.ListenAddress
}

func waitUp(t *testing.T, c *http.Client, url string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if resp, err := c.Get(url); err == nil {
			resp.Body.Close()
			return
		}
	}
	t.Fatalf("%s never answered", url)
}

func TestTLSAndBasicAuth(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, pool := selfSigned(t, dir)
	// bcrypt of "s3cret" (cost 4, test only).
	webConfig := filepath.Join(dir, "web.yml")
	os.WriteFile(webConfig, []byte(fmt.Sprintf(`tls_server_config:
  cert_file: %s
  key_file: %s
basic_auth_users:
  prometheus: $2a$04$RpK6ouYElY04Z2m.Zl4CIOmljTYL9IRUmUpdHek9AFHiuU4DTqO/a
`, certFile, keyFile)), 0o600)
	_, addr := serve(t, webConfig, 10)

	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: 5 * time.Second}
	url := "https://" + addr + "/metrics"
	waitUp(t, client, url)
	for _, tc := range []struct {
		name, user, pass string
		want             int
	}{
		{"no password", "", "", http.StatusUnauthorized},
		{"wrong password", "prometheus", "guess", http.StatusUnauthorized},
		{"right password", "prometheus", "s3cret", http.StatusOK},
	} {
		req, _ := http.NewRequest("GET", url, nil)
		if tc.user != "" {
			req.SetBasicAuth(tc.user, tc.pass)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("%s: status %d, want %d", tc.name, resp.StatusCode, tc.want)
		}
	}
	// Plain HTTP is refused.
	if resp, err := http.Get("http://" + addr + "/metrics"); err == nil {
		if resp.StatusCode == http.StatusOK {
			t.Error("plain HTTP served metrics")
		}
		resp.Body.Close()
	}
}

// blocking holds every Collect until released, and says when one began.
type blocking struct{ entered, release chan struct{} }

func (b blocking) Describe(chan<- *prometheus.Desc) {}
func (b blocking) Collect(chan<- prometheus.Metric) {
	b.entered <- struct{}{}
	<-b.release
}

func TestScrapeConcurrencyCap(t *testing.T) {
	d, addr := serve(t, "", 2)
	b := blocking{entered: make(chan struct{}, 3), release: make(chan struct{})}
	d.reg.MustRegister(b)
	url := "http://" + addr + "/metrics"
	c := &http.Client{Timeout: 30 * time.Second}
	waitUp(t, c, "http://"+addr+"/healthz")

	var wg sync.WaitGroup
	for range 2 { // these two hold the slots
		wg.Go(func() {
			if resp, err := c.Get(url); err == nil {
				resp.Body.Close()
			}
		})
	}
	for range 2 { // both are gathering
		select {
		case <-b.entered:
		case <-time.After(10 * time.Second):
			close(b.release)
			t.Fatal("the first two scrapes never reached the collector")
		}
	}
	resp, err := c.Get(url)
	close(b.release)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("third concurrent scrape: status %d, want 503", resp.StatusCode)
	}
}
