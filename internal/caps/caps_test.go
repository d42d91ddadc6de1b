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
