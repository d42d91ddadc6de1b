// Package probe holds what every probe shares: the sentinel for "this
// kernel cannot run it" and the classification of load errors.
package probe

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
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
	joined := errors.Join(errs...)
	if all {
		return fmt.Errorf("%w: %w", ErrUnsupported, joined)
	}
	return joined
}
