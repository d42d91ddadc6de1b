package probe

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

func TestUnsupported(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{ErrUnsupported, true},
		{fmt.Errorf("map type: %w", ebpf.ErrNotSupported), true},
		{fmt.Errorf("load: %w", unix.EPERM), false},
		{fmt.Errorf("%w: %w", ebpf.ErrNotSupported, unix.EPERM), false},
		{errors.New("boom"), false},
	} {
		if got := Unsupported(tc.err); got != tc.want {
			t.Errorf("Unsupported(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
	if err := Combine([]error{ErrUnsupported, fmt.Errorf("x: %w", ebpf.ErrNotSupported)}); !errors.Is(err, ErrUnsupported) {
		t.Errorf("all unsupported: %v", err)
	}
	if err := Combine([]error{ErrUnsupported, errors.New("boom")}); errors.Is(err, ErrUnsupported) {
		t.Errorf("one failure: %v", err)
	}
}

func TestCombineKeepsVerifierLog(t *testing.T) {
	ve := &ebpf.VerifierError{Log: []string{"unknown func bpf_task_storage_get#156"}}
	err := Combine([]error{fmt.Errorf("tp_btf: %w", ve), errors.New("raw_tp: boom")})
	var got *ebpf.VerifierError
	if !errors.As(err, &got) || got != ve {
		t.Errorf("verifier error lost from %v", err)
	}
	if errors.Is(err, ErrUnsupported) {
		t.Error("a failed alternative was reported as unsupported")
	}
}

func TestCause(t *testing.T) {
	for err, want := range map[error]string{
		fmt.Errorf("apply CO-RE relocations: load kernel spec: no BTF found for kernel version 6.1: %w", ebpf.ErrNotSupported): "kernel BTF not found",
		errors.New("load kernel spec: parsing .BTF header: read header: buffer too small"):                                     "kernel BTF unreadable",
		fmt.Errorf("map create: %w", unix.EPERM):                                                                               "permission denied",
		errors.New("boom"):                                                                                                     "",
	} {
		if got := Cause(err); !strings.HasPrefix(got, want) || (want == "" && got != "") {
			t.Errorf("Cause(%v) = %q, want %q...", err, got, want)
		}
	}
}

// A preferred variant that fails for another reason than the kernel's
// lack of support is a warning even when a later one loads; one the
// kernel does not support is not.
func TestFirstLoadingWarns(t *testing.T) {
	vs := []Variant{{Hook: HookBTF, Storage: StorageTask}, {Hook: HookBTF, Storage: StorageHash}, {Hook: HookRaw, Storage: StorageHash}}
	for _, tc := range []struct {
		first error
		warn  bool
	}{
		{fmt.Errorf("load programs: %w", ErrUnsupported), false},
		{errors.New("load programs: program too large"), true},
	} {
		var logs strings.Builder
		log := slog.New(slog.NewTextHandler(&logs, nil))
		n := 0
		_, v, err := FirstLoading(vs, log, func(v Variant) (int, error) {
			if n++; n == 1 {
				return 0, tc.first
			}
			return n, nil
		})
		if err != nil || v.String() != vs[1].String() {
			t.Fatalf("%v: loaded %v, %v; want the second variant", tc.first, v, err)
		}
		if got := strings.Contains(logs.String(), "level=WARN"); got != tc.warn {
			t.Errorf("%v: warning logged %v, want %v:\n%s", tc.first, got, tc.warn, logs.String())
		}
	}
}
