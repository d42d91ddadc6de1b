package probe

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

// ErrUnsupported marks a probe that cannot run on this kernel (a missing
// program type, map type, helper or hook), as opposed to one that failed.
var ErrUnsupported = errors.New("unsupported on this kernel")

// Unsupported reports whether err means the kernel lacks a feature the
// probe needs.
func Unsupported(err error) bool {
	// A feature probe refused for lack of privilege says nothing about the
	// kernel.
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return false
	}
	if errors.Is(err, ErrUnsupported) || errors.Is(err, ebpf.ErrNotSupported) {
		return true
	}
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		// The verifier's words for a helper or attach point this kernel
		// does not offer to this program type.
		for _, l := range ve.Log {
			if strings.Contains(l, "unknown func") ||
				strings.Contains(l, "program of this type cannot use helper") ||
				strings.Contains(l, "not supported") {
				return true
			}
		}
	}
	return false
}

// Combine joins the errors of alternatives that were tried in turn. The
// result wraps ErrUnsupported only if every alternative was unsupported,
// and reads as one line per alternative.
func Combine(errs []error) error {
	if len(errs) == 0 {
		return nil
	}
	all := true
	for _, err := range errs {
		all = all && Unsupported(err)
	}
	if all {
		return fmt.Errorf("%w: %w", ErrUnsupported, errors.Join(errs...))
	}
	// Not all unsupported: the unsupported ones must not make the whole
	// look unsupported, but their verifier logs stay reachable.
	hid := make([]error, len(errs))
	for i, err := range errs {
		if Unsupported(err) {
			err = hidden{err}
		}
		hid[i] = err
	}
	return errors.Join(hid...)
}

// hidden shows an error's text and its verifier error, if any, but not its
// identity (ErrUnsupported, ebpf.ErrNotSupported).
type hidden struct{ err error }

func (h hidden) Error() string { return h.err.Error() }

func (h hidden) As(target any) bool {
	if p, ok := target.(**ebpf.VerifierError); ok {
		return errors.As(h.err, p)
	}
	return false
}

// Cause names the root cause of a load error in a few words when it is one
// a user can act on, and is empty otherwise.
func Cause(err error) string {
	msg := err.Error()
	switch {
	// cilium/ebpf reports a missing vmlinux BTF as ErrNotSupported with
	// this text, not as btf.ErrNotFound.
	case errors.Is(err, btf.ErrNotFound) || strings.Contains(msg, "no BTF found for kernel"):
		return "kernel BTF not found (/sys/kernel/btf/vmlinux; CONFIG_DEBUG_INFO_BTF)"
	case strings.Contains(msg, "load kernel spec: parsing"):
		return "kernel BTF unreadable (/sys/kernel/btf/vmlinux)"
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return "permission denied (capabilities?)"
	}
	return ""
}

// ErrAttrs are the log attributes of a load error: err, and the
// verifier's full log when the verifier refused a program.
func ErrAttrs(err error) []any {
	attrs := []any{"err", err}
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		attrs = append(attrs, "verifier_log", fmt.Sprintf("%+v", ve))
	}
	return attrs
}
