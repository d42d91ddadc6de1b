package kubeclient

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func write(t *testing.T, dir, name, text string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// KUBECONFIG with several files, as kubectl reads it: merged, the first
// file to set a value winning, missing files skipped.
func TestColonSeparated(t *testing.T) {
	dir := t.TempDir()
	// The first file only picks the context; the second defines it.
	first := write(t, dir, "first", "apiVersion: v1\nkind: Config\ncurrent-context: b\n")
	second := write(t, dir, "second", `apiVersion: v1
kind: Config
clusters:
- {name: a, cluster: {server: "https://127.0.0.1:1001"}}
- {name: b, cluster: {server: "https://127.0.0.1:1002", insecure-skip-tls-verify: true}}
users: [{name: u, user: {token: secret}}]
contexts:
- {name: a, context: {cluster: a, user: u}}
- {name: b, context: {cluster: b, user: u}}
current-context: a
`)
	missing := filepath.Join(dir, "missing")
	c, err := Config(strings.Join([]string{missing, first, second}, ":"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Host != "https://127.0.0.1:1002" || c.BearerToken != "secret" {
		t.Errorf("host %q, token %q: want the second file's context b, picked by the first file", c.Host, c.BearerToken)
	}
	if c.UserAgent != "ktel" || !strings.HasPrefix(c.ContentType, "application/vnd.kubernetes.protobuf") {
		t.Errorf("user agent %q, content type %q", c.UserAgent, c.ContentType)
	}
}

// A bad KUBECONFIG, or none outside a Pod, is an error that names
// KUBECONFIG.
func TestBadKubeconfig(t *testing.T) {
	dir := t.TempDir()
	garbage := write(t, dir, "garbage", "this: [is not\n")
	noContext := write(t, dir, "empty", "apiVersion: v1\nkind: Config\n")
	// Not in a Pod, whatever the machine running the test.
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	t.Setenv("KUBERNETES_SERVICE_PORT", "")
	for _, tc := range []struct{ name, kubeconfig, want string }{
		{"missing", filepath.Join(dir, "a") + ":" + filepath.Join(dir, "b"), "none of its files exists"},
		{"malformed", garbage, garbage},
		{"no cluster", noContext, "KUBECONFIG=" + `"` + noContext},
		{"unset outside a Pod", "", "KUBECONFIG is not set"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Config(tc.kubeconfig)
			if err == nil {
				t.Fatal("no error")
			}
			t.Log(err)
			if !strings.Contains(err.Error(), "KUBECONFIG") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q: want KUBECONFIG and %q in it", err, tc.want)
			}
		})
	}
}
