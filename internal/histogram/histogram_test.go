package histogram

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// nativeIndex is the exact native bucket index of ns nanoseconds: the
// smallest i with ns/1e9 <= 2^(i/2^schema), decided in integers by
// withinBound. (TestAgreesWithClientGolang checks the convention against
// an independent implementation.)
func nativeIndex(ns uint64, schema int) int {
	per := 1 << schema
	// Start below the answer and walk up; the float estimate is close.
	i := int(math.Floor(math.Log2(float64(ns)/1e9)*float64(per))) - 2
	for !withinBound(ns, i, per) {
		i++
	}
	return i
}

// interesting returns values around every bound and power of two, plus
// random values over the whole range.
func interesting(l *Layout, r *rand.Rand) []uint64 {
	var vs []uint64
	for _, b := range l.Bounds {
		vs = append(vs, b-1, b, b+1)
	}
	for e := 0; e < 64; e++ {
		p := uint64(1) << e
		vs = append(vs, p-1, p, p+1)
	}
	for range 20000 {
		// Log-uniform over 1 ns .. 2^40 ns.
		vs = append(vs, uint64(math.Exp2(r.Float64()*40)))
	}
	return append(vs, 0, 1, math.MaxUint64)
}

func TestSlotMatchesNativeBucket(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for schema := MinSchema; schema <= MaxSchema; schema++ {
		l, err := NewLayout(schema)
		if err != nil {
			t.Fatal(err)
		}
		zeroNs := uint64(math.Ldexp(1e9, MinExp)) // floor: the zero bucket's last whole ns
		for _, ns := range interesting(l, r) {
			k := l.Slot(ns)
			switch {
			case ns <= zeroNs:
				if k != 0 {
					t.Fatalf("schema %d: %d ns is in the zero bucket, got slot %d", schema, ns, k)
				}
			case k == l.Slots()-1:
				if want := nativeIndex(ns, schema); want <= MaxExp<<schema {
					t.Fatalf("schema %d: %d ns (native %d) in overflow slot", schema, ns, want)
				}
			default:
				if got, want := l.FirstIndex()+k, nativeIndex(ns, schema); got != want {
					t.Fatalf("schema %d: %d ns: slot %d is native bucket %d, want %d", schema, ns, k, got, want)
				}
			}
		}
	}
}

// TestAgreesWithClientGolang checks the bucket convention (upper bounds
// inclusive, index i covering (2^((i-1)/2^s), 2^(i/2^s)]) against the
// native histogram of client_golang itself, away from float rounding.
func TestAgreesWithClientGolang(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for schema := MinSchema; schema <= MaxSchema; schema++ {
		l, _ := NewLayout(schema)
		for range 2000 {
			ns := uint64(math.Exp2(6 + r.Float64()*30))
			h := prometheus.NewHistogram(prometheus.HistogramOpts{
				Name:                            "x",
				NativeHistogramBucketFactor:     math.Exp2(math.Exp2(-float64(schema))) * 1.001,
				NativeHistogramZeroThreshold:    prometheus.NativeHistogramZeroThresholdZero,
				NativeHistogramMaxBucketNumber:  0,
				NativeHistogramMinResetDuration: 0,
			})
			h.Observe(float64(ns) / 1e9)
			var m dto.Metric
			if err := h.Write(&m); err != nil {
				t.Fatal(err)
			}
			if got := m.Histogram.GetSchema(); got != int32(schema) {
				t.Fatalf("client_golang chose schema %d, want %d", got, schema)
			}
			want := int(m.Histogram.PositiveSpan[0].GetOffset())
			if got := l.FirstIndex() + l.Slot(ns); got != want {
				t.Fatalf("schema %d: %d ns: native bucket %d, client_golang says %d", schema, ns, got, want)
			}
		}
	}
}

func TestFloorBoundExactPowers(t *testing.T) {
	for schema := MinSchema; schema <= MaxSchema; schema++ {
		per := 1 << schema
		for e := MinExp; e <= MaxExp; e++ {
			want := uint64(math.Floor(math.Ldexp(1e9, e)))
			if got := FloorBound(e*per, schema); got != want {
				t.Errorf("schema %d: bound of 2^%d s = %d ns, want %d", schema, e, got, want)
			}
		}
	}
}

func TestLayoutShape(t *testing.T) {
	for schema, slots := range []int{36, 70, 138, 274, 546} {
		l, err := NewLayout(schema)
		if err != nil {
			t.Fatal(err)
		}
		if l.Slots() != slots {
			t.Errorf("schema %d: %d slots, want %d", schema, l.Slots(), slots)
		}
		if l.Slots() > MaxBounds {
			t.Errorf("schema %d: %d slots exceed the kernel table", schema, l.Slots())
		}
		for j := 1; j < len(l.Bounds); j++ {
			if l.Bounds[j] <= l.Bounds[j-1] {
				t.Fatalf("schema %d: bounds not increasing at %d", schema, j)
			}
		}
		table := l.KernelTable()
		if table[MaxBounds-1] != math.MaxUint64 {
			t.Errorf("schema %d: kernel table not padded", schema)
		}
	}
	for _, bad := range []int{-1, 5} {
		if _, err := NewLayout(bad); err == nil {
			t.Errorf("schema %d accepted", bad)
		}
	}
}

func TestNativeAndClassic(t *testing.T) {
	l, _ := NewLayout(3)
	slots := make([]uint64, l.Slots())
	observe := func(ns uint64, n uint64) { slots[l.Slot(ns)] += n }
	observe(10, 1)        // zero bucket
	observe(1000, 2)      // 1 µs: just above 2^-20 s (953.67 ns)
	observe(953, 3)       // just below 2^-20 s
	observe(2_000_000, 4) // 2 ms
	observe(600e9, 5)     // 10 min: overflow
	observe(1<<40, 6)     // ~1100 s: overflow as well

	if slots[0] != 1 {
		t.Errorf("zero bucket %d, want 1", slots[0])
	}
	// The overflow slot is exported as the native bucket just above 2^MaxExp s.
	if last := l.Slots() - 1; slots[last] != 11 || l.FirstIndex()+last != MaxExp*8+1 {
		t.Errorf("overflow slot %d holds %d, native index %d; want 11 at %d", last, slots[last], l.FirstIndex()+last, MaxExp*8+1)
	}
	classic := map[float64]uint64{}
	for i, c := range l.Classic(slots) {
		classic[ClassicBounds()[i]] = c
	}
	want := map[float64]uint64{
		math.Ldexp(1, -20): 1 + 3, // <= 953.67 ns
		math.Ldexp(1, -19): 6,     // <= 1.91 µs
		math.Ldexp(1, -9):  6,     // <= 1.95 ms: 2 ms is above
		math.Ldexp(1, -8):  10,    // <= 3.91 ms
		math.Ldexp(1, 4):   10,    // <= 16 s: overflow only in +Inf
	}
	for ub, c := range want {
		if classic[ub] != c {
			t.Errorf("classic le=%g: %d, want %d", ub, classic[ub], c)
		}
	}
	if len(classic) != ClassicMaxExp-ClassicMinExp+1 {
		t.Errorf("%d classic buckets", len(classic))
	}
}
