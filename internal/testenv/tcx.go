package testenv

import (
	"errors"
	"math"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
)

var tcx struct {
	once sync.Once
	have bool
	err  error
}

// HaveTCX reports whether the kernel has tcx links (6.6+), so that tests
// of the TC hook can assert what the kernel supports: tcx where it has it,
// clsact's cls_bpf filters where not. It asks as link.AttachTCX does: an
// attach to an interface that cannot exist fails with ENODEV where tcx
// exists and with ebpf.ErrNotSupported where not. Nothing is attached.
func HaveTCX(tb testing.TB) bool {
	tb.Helper()
	tcx.once.Do(func() {
		prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
			Type:         ebpf.SchedCLS,
			License:      "GPL",
			Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
		})
		if err != nil {
			tcx.err = err
			return
		}
		defer prog.Close()
		l, err := link.AttachTCX(link.TCXOptions{Interface: math.MaxUint32, Program: prog, Attach: ebpf.AttachTCXIngress})
		switch {
		case err == nil:
			l.Close()
			tcx.err = errors.New("tcx attached to an interface that cannot exist")
		case errors.Is(err, ebpf.ErrNotSupported):
		default:
			tcx.have = true
		}
	})
	if tcx.err != nil {
		tb.Fatal(tcx.err)
	}
	return tcx.have
}
