package deploy

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestSystemdUnit runs systemd-analyze verify on deploy/systemd/ktel.service
// with ExecStart pointing at a built binary (verify checks that it exists),
// and checks that the example environment file names only variables ktel
// knows.
func TestSystemdUnit(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze not found: apt-get install systemd")
	}
	unit, err := os.ReadFile(filepath.Join(root, "deploy/systemd/ktel.service"))
	if err != nil {
		t.Fatal(err)
	}
	const execStart = "ExecStart=/usr/local/bin/ktel\n"
	if !bytes.Contains(unit, []byte(execStart)) {
		t.Fatalf("ktel.service has no %q", execStart)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "ktel.service")
	unit = bytes.Replace(unit, []byte(execStart), []byte("ExecStart="+binary(t)+"\n"), 1)
	if err := os.WriteFile(path, unit, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", "--man=no", path).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	// --threshold is in tenths: 30 is an exposure of 3.0.
	if out, err := exec.Command(analyze, "security", "--offline=yes", "--threshold=30", path).CombinedOutput(); err != nil {
		t.Errorf("systemd-analyze security: exposure above 3.0 (%v)\n%s", err, out)
	} else {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		t.Log(lines[len(lines)-1])
	}

	known := variables(t)
	env, err := os.ReadFile(filepath.Join(root, "deploy/systemd/ktel.env"))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`(?m)^#?(KTEL_[A-Z0-9_]+)=`).FindAllSubmatch(env, -1) {
		if !known[string(m[1])] {
			t.Errorf("ktel.env sets %s, which ktel --help does not list", m[1])
		}
	}
}
