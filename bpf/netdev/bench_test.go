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

// BenchmarkPrograms runs each program on a UDP frame in the kernel
// (BPF_PROG_TEST_RUN, which runs skb programs on the loopback device:
// ifindex 1), against an empty program: the per-packet cost of counting.
func BenchmarkPrograms(b *testing.B) {
	testenv.Privileged(b)
	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}})
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()
	for _, sizes := range []bool{false, true} {
		p := &Probe{slots: 4, sizes: sizes, hook: HookXDP}
		p.ncpu, _ = ebpf.PossibleCPU()
		if err := p.load(); err != nil {
			b.Fatal(err)
		}
		defer p.Close()
		if err := p.counters.Update(uint32(1), make([]netdevNetdevValue, p.ncpu), 0); err != nil {
			b.Fatal(err)
		}
		progs := map[string]*ebpf.Program{"empty": empty, "tc_ingress": p.progs[netdevProgNetdevTcIngress], "xdp_ingress": p.progs[netdevProgNetdevXdpIngress]}
		for name, prog := range progs {
			if sizes && name == "empty" {
				continue
			}
			if sizes {
				name += "+sizes"
			}
			b.Run(name, func(b *testing.B) {
				_, d, err := prog.Benchmark(udpFrame(), b.N, b.ResetTimer)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(float64(d.Nanoseconds()), "ns/packet")
			})
		}
	}
}
