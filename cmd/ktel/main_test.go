package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/config"
	"github.com/ktel-dev/ktel/internal/daemon"
)

// runBounded calls run and fails the test if it does not return promptly:
// a regression that lets an invalid configuration through would otherwise
// start the daemon and hang the test.
func runBounded(t *testing.T, args ...string) (status int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- run(args, &out, &errb) }()
	select {
	case status = <-done:
	case <-time.After(5 * time.Second):
		t.Fatalf("run(%q) still running after 5s: it should have returned before starting anything", args)
	}
	return status, out.String(), errb.String()
}

func TestRunHelp(t *testing.T) {
	for _, arg := range []string{"--help", "-h", "help"} {
		t.Run(arg, func(t *testing.T) {
			status, stdout, stderr := runBounded(t, arg)
			if status != exitOK {
				t.Errorf("status %d, want %d", status, exitOK)
			}
			if stderr != "" {
				t.Errorf("stderr not empty: %q", stderr)
			}
			for _, f := range config.Fields() {
				if !strings.Contains(stdout, f.Var) {
					t.Errorf("help does not mention %s", f.Var)
				}
			}
			for _, p := range daemon.Probes() {
				if !strings.Contains(stdout, p.Name) {
					t.Errorf("help does not mention probe %s", p.Name)
				}
			}
		})
	}
}

func TestRunVersion(t *testing.T) {
	for _, arg := range []string{"--version", "version"} {
		t.Run(arg, func(t *testing.T) {
			status, stdout, _ := runBounded(t, arg)
			if status != exitOK {
				t.Errorf("status %d, want %d", status, exitOK)
			}
			if !strings.HasPrefix(stdout, "ktel ") {
				t.Errorf("stdout %q, want it to start with \"ktel \"", stdout)
			}
		})
	}
}

func TestRunBadArgs(t *testing.T) {
	tests := [][]string{
		{"--nosuch"},
		{"serve"},
		{"check", "extra"},
		{"--help", "--version"},
	}
	for _, args := range tests {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			status, stdout, stderr := runBounded(t, args...)
			if status != exitUsage {
				t.Errorf("status %d, want %d", status, exitUsage)
			}
			if stdout != "" {
				t.Errorf("stdout not empty: %q", stdout)
			}
			if !strings.Contains(stderr, "unexpected arguments") || !strings.Contains(stderr, "Usage:") {
				t.Errorf("stderr lacks the complaint and the usage:\n%s", stderr)
			}
		})
	}
}

// TestRunInvalidConfig covers only invalid values: with a valid
// configuration run would start the daemon.
func TestRunInvalidConfig(t *testing.T) {
	tests := []struct {
		name, value string
		args        []string
		want        []string // in stderr, besides the variable's name
	}{
		{name: "KTEL_HISTOGRAM_SCHEMA", value: "9", want: []string{`"9"`, "0..4"}},
		{name: "KTEL_HISTOGRAM_SCHEMA", value: "three", want: []string{`"three"`, "0..4"}},
		{name: "KTEL_LOG_FORMAT", value: "xml", want: []string{"text|json"}},
		{name: "KTEL_PROBES", value: "nosuch", want: []string{`"nosuch"`}},
		{name: "KTEL_LISTEN_ADDRESS", value: "localhost", want: []string{"host:port"}},
		// check validates the configuration before loading anything too.
		{name: "KTEL_SYSCALL_HOOK", value: "kprobe", args: []string{"check"}, want: []string{"tp_btf"}},
	}
	for _, tt := range tests {
		t.Run(tt.name+"="+tt.value, func(t *testing.T) {
			t.Setenv(tt.name, tt.value)
			status, stdout, stderr := runBounded(t, tt.args...)
			if status != exitUsage {
				t.Errorf("status %d, want %d", status, exitUsage)
			}
			if stdout != "" {
				t.Errorf("stdout not empty: %q", stdout)
			}
			for _, w := range append([]string{tt.name}, tt.want...) {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr does not contain %q:\n%s", w, stderr)
				}
			}
		})
	}
}
