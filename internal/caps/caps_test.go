package caps

import "testing"

func TestParseAndString(t *testing.T) {
	for _, in := range []string{"CAP_BPF", "cap_bpf", "bpf", " BPF "} {
		if c, err := Parse(in); err != nil || c != BPF {
			t.Errorf("Parse(%q) = %v, %v", in, c, err)
		}
	}
	if _, err := Parse("CAP_FLY"); err == nil {
		t.Error("CAP_FLY accepted")
	}
	if s := Of(BPF, NetAdmin).String(); s != "CAP_NET_ADMIN,CAP_BPF" {
		t.Errorf("String = %q", s)
	}
	if Set(0).String() != "none" {
		t.Error("empty set")
	}
}

func TestHasSysAdminImplies(t *testing.T) {
	s := Of(SysAdmin)
	if !s.Has(BPF) || !s.Has(Perfmon) || s.Has(NetAdmin) {
		t.Error("CAP_SYS_ADMIN implies CAP_BPF and CAP_PERFMON only")
	}
	if m := Of(BPF).Missing([]Cap{BPF, Perfmon, NetAdmin}); len(m) != 2 || m[0] != Perfmon || m[1] != NetAdmin {
		t.Errorf("Missing = %v", m)
	}
}

func TestWithStandIns(t *testing.T) {
	keep := Of(BPF, Perfmon, NetAdmin)
	for _, tc := range []struct {
		held, want Set
	}{
		{Of(BPF, Perfmon, NetAdmin, SysAdmin), keep},       // CAP_BPF held: CAP_SYS_ADMIN goes
		{Of(SysAdmin, NetAdmin), keep | Of(SysAdmin)},      // only CAP_SYS_ADMIN stands in
		{Of(BPF, SysAdmin, NetAdmin), keep | Of(SysAdmin)}, // for CAP_PERFMON
		{Of(NetAdmin), keep},                               // nothing to stand in
	} {
		if got := keep.WithStandIns(tc.held); got != tc.want {
			t.Errorf("keep %v held %v: %v, want %v", keep, tc.held, got, tc.want)
		}
	}
	if got := Of(NetAdmin).WithStandIns(Of(SysAdmin, NetAdmin)); got != Of(NetAdmin) {
		t.Errorf("CAP_SYS_ADMIN kept for a set without CAP_BPF or CAP_PERFMON: %v", got)
	}
}
