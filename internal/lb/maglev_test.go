package lb

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
)

func backends(n int) []Backend {
	out := make([]Backend, n)
	for i := range out {
		out[i] = Backend{Addr: netip.MustParseAddrPort(fmt.Sprintf("10.0.%d.%d:8080", i/250, i%250+1)), Weight: 1}
	}
	return out
}

func shares(table []uint32, n int) []int {
	c := make([]int, n)
	for _, e := range table {
		c[e]++
	}
	return c
}

func TestMaglevSpread(t *testing.T) {
	for _, tc := range []struct{ n, m int }{{3, 251}, {10, 1021}, {7, 16381}, {100, 16381}} {
		table, err := Maglev(backends(tc.n), tc.m)
		if err != nil {
			t.Fatal(err)
		}
		c := shares(table, tc.n)
		lo, hi := slices.Min(c), slices.Max(c)
		// Maglev fills in rounds, so shares differ by at most one round's
		// skew: one entry per backend in the ideal case, a little more
		// when late turns find their preferred entries taken.
		ideal := float64(tc.m) / float64(tc.n)
		if float64(hi) > ideal*1.05+1 || float64(lo) < ideal*0.95-1 {
			t.Errorf("n=%d m=%d: shares %d..%d, ideal %.1f", tc.n, tc.m, lo, hi, ideal)
		}
	}
}

func TestMaglevWeights(t *testing.T) {
	bs := backends(3)
	bs[0].Weight = 2
	bs[2].Weight = 4
	table, err := Maglev(bs, 16381)
	if err != nil {
		t.Fatal(err)
	}
	c := shares(table, 3)
	for i, w := range []float64{2, 1, 4} {
		want := w / 7 * 16381
		if d := float64(c[i]) - want; d > want*0.02 || d < -want*0.02 {
			t.Errorf("backend %d (weight %v): %d entries, want %.0f", i, w, c[i], want)
		}
	}
}

// Removing one of N backends moves the entries it had and few others;
// adding one takes about 1/(N+1) of the table.
func TestMaglevDisruption(t *testing.T) {
	const n, m = 10, 4093
	bs := backends(n)
	before, _ := Maglev(bs, m)
	addr := func(bs []Backend, table []uint32, i int) netip.AddrPort { return bs[table[i]].Addr }

	removed := slices.Delete(slices.Clone(bs), 4, 5)
	after, _ := Maglev(removed, m)
	var own, moved int
	for i := range m {
		if addr(bs, before, i) == bs[4].Addr {
			own++
			continue
		}
		if addr(bs, before, i) != addr(removed, after, i) {
			moved++
		}
	}
	// Entries of other backends that moved: a few percent at most (the
	// paper reports about 1-2% extra disruption).
	if float64(moved) > 0.05*float64(m-own) {
		t.Errorf("removing 1 of %d moved %d of %d entries of other backends", n, moved, m-own)
	}

	added := append(slices.Clone(bs), Backend{Addr: netip.MustParseAddrPort("10.9.9.9:8080"), Weight: 1})
	grown, _ := Maglev(added, m)
	var changed int
	for i := range m {
		if addr(bs, before, i) != addr(added, grown, i) {
			changed++
		}
	}
	if ideal := float64(m) / (n + 1); float64(changed) > ideal*1.3 {
		t.Errorf("adding an 11th backend changed %d entries, ideal %.0f", changed, ideal)
	}

	// Deterministic, and independent of the backends' order.
	again, _ := Maglev(bs, m)
	if !slices.Equal(before, again) {
		t.Error("not deterministic")
	}
	rev := slices.Clone(bs)
	slices.Reverse(rev)
	revTable, _ := Maglev(rev, m)
	var differ int
	for i := range m {
		if addr(bs, before, i) != addr(rev, revTable, i) {
			differ++
		}
	}
	if float64(differ) > 0.05*m {
		t.Errorf("reordering backends moved %d of %d entries", differ, m)
	}
}

func TestMaglevErrors(t *testing.T) {
	if _, err := Maglev(backends(2), 100); err == nil {
		t.Error("non-prime size accepted")
	}
	if _, err := Maglev(backends(300), 251); err == nil {
		t.Error("more backends than entries accepted")
	}
	if table, err := Maglev(nil, 251); err != nil || table != nil {
		t.Errorf("no backends: %v %v", table, err)
	}
}
