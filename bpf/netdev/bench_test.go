package netdev

import (
	"encoding/binary"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// udpFrame is an Ethernet + IPv4 + UDP frame with a 64-byte payload.
func udpFrame() []byte {
	f := make([]byte, 14+20+8+64)
	binary.BigEndian.PutUint16(f[12:], 0x0800)
	f[14] = 0x45
	binary.BigEndian.PutUint16(f[16:], uint16(len(f)-14))
	f[22], f[23] = 64, 17 // TTL, UDP
	copy(f[26:], []byte{10, 0, 0, 1, 10, 0, 0, 2})
	binary.BigEndian.PutUint16(f[38:], uint16(8+64))
	return f
}

// emptyProgram returns, at once, what the probe's programs return.
func emptyProgram(tb testing.TB, typ ebpf.ProgramType) *ebpf.Program {
	tb.Helper()
	ret := int32(-1) // TC_ACT_UNSPEC
	if typ == ebpf.XDP {
		ret = 2 // XDP_PASS
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: typ, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, ret), asm.Return()}})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { prog.Close() })
	return prog
}

// loadBare loads the programs and maps without a watcher, with slot 1
// given to the loopback device: BPF_PROG_TEST_RUN runs skb and XDP
// programs on it (ifindex 1).
func loadBare(tb testing.TB, sizes bool) *Probe {
	tb.Helper()
	p := &Probe{slots: 4, sizes: sizes, hook: HookXDP}
	p.ncpu, _ = ebpf.PossibleCPU()
	if err := p.load(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { p.Close() })
	if err := p.setSlot(1, 1); err != nil {
		tb.Fatal(err)
	}
	return p
}

// BenchmarkPrograms runs each program on a UDP frame in the kernel
// (BPF_PROG_TEST_RUN), beside an empty program of the same type: the
// difference is the per-packet cost of counting. ns/packet is the
// kernel's own measure (whole nanoseconds); it also reports the
// instructions the verifier processed and the JITed size.
func BenchmarkPrograms(b *testing.B) {
	testenv.Privileged(b)
	type bench struct {
		name string
		prog *ebpf.Program
	}
	benches := []bench{
		{"empty_tc", emptyProgram(b, ebpf.SchedCLS)},
		{"empty_xdp", emptyProgram(b, ebpf.XDP)},
	}
	for _, sizes := range []bool{false, true} {
		p := loadBare(b, sizes)
		suffix := ""
		if sizes {
			suffix = "+sizes"
		}
		benches = append(benches,
			bench{"tc_ingress" + suffix, p.progs[netdevProgNetdevTcIngress]},
			bench{"xdp_ingress" + suffix, p.progs[netdevProgNetdevXdpIngress]})
	}
	for _, bc := range benches {
		b.Run(bc.name, func(b *testing.B) {
			_, d, err := bc.prog.Benchmark(udpFrame(), b.N, b.ResetTimer)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(d.Nanoseconds()), "ns/packet")
			if info, err := bc.prog.Info(); err == nil {
				if n, ok := info.VerifiedInstructions(); ok {
					b.ReportMetric(float64(n), "verified-insns")
				}
				if n, ok := info.JitedSize(); ok == nil {
					b.ReportMetric(float64(n), "jited-bytes")
				}
			}
		})
	}
}
