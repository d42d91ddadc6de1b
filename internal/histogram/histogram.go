// Package histogram is the one place that knows how kernel latency slots map
// to Prometheus buckets. The kernel sorts each observation (integral
// nanoseconds) into slots whose upper bounds are exactly those of a native
// histogram of a given schema, so the conversion to native buckets is
// lossless and classic power-of-two buckets can be derived from them exactly.
package histogram

import (
	"fmt"
	"math"
	"math/big"
)

const (
	// MaxBounds is the size of the bounds table handed to the kernel; it must
	// equal KTEL_MAX_BOUNDS in bpf/headers/ktel_hist.h.
	MaxBounds = 1024

	// MinExp and MaxExp delimit the finely resolved range, in powers of two
	// of seconds: observations up to 2^MinExp s (about 30 ns) go to the zero
	// bucket; those above 2^MaxExp s (512 s) to a single overflow slot.
	MinExp = -25
	MaxExp = 9

	// MinSchema and MaxSchema are the native-histogram schemas the kernel
	// tables support (at most 16 buckets per power of two).
	MinSchema = 0
	MaxSchema = 4

	// ClassicMinExp and ClassicMaxExp delimit the classic buckets: upper
	// bounds 2^-20 s (about 1 µs) to 2^4 s (16 s), one per power of two.
	ClassicMinExp = -20
	ClassicMaxExp = 4
	// ClassicBuckets is the number of classic buckets, +Inf aside.
	ClassicBuckets = ClassicMaxExp - ClassicMinExp + 1
)

// Layout describes the kernel slots for one schema.
//
// Slot 0 counts observations <= 2^MinExp s (the native zero bucket). Slot k,
// 1 <= k < len(Bounds), counts observations in (Bounds[k-1], Bounds[k]] ns,
// which is exactly native bucket FirstIndex()+k. The last slot counts
// observations above the last bound; exported as native bucket
// FirstIndex()+Slots()-1, the one just above 2^MaxExp s, it is the one
// lossy part of the conversion.
type Layout struct {
	Schema int32
	// Bounds are the slot upper bounds in nanoseconds:
	// Bounds[j] = floor(1e9 * 2^((MinExp*2^Schema + j) / 2^Schema)).
	Bounds []uint64
}

// NewLayout computes the slot bounds for schema exactly.
func NewLayout(schema int) (*Layout, error) {
	if schema < MinSchema || schema > MaxSchema {
		return nil, fmt.Errorf("histogram schema %d out of range %d..%d", schema, MinSchema, MaxSchema)
	}
	per := 1 << schema
	n := (MaxExp-MinExp)*per + 1
	l := &Layout{Schema: int32(schema), Bounds: make([]uint64, n)}
	for j := range n {
		l.Bounds[j] = FloorBound(MinExp*per+j, schema)
	}
	return l, nil
}

// Slots is the number of kernel slots: the bounds plus the overflow slot.
func (l *Layout) Slots() int { return len(l.Bounds) + 1 }

// FirstIndex is the native bucket index of slot 0's upper bound; slot k
// (0 < k < Slots()-1) is native bucket FirstIndex()+k.
func (l *Layout) FirstIndex() int { return MinExp << l.Schema }

// ZeroThreshold is the native zero-bucket threshold in seconds.
func (l *Layout) ZeroThreshold() float64 { return math.Ldexp(1, MinExp) }

// KernelTable returns the bounds padded to MaxBounds with the largest
// uint64, as the kernel's binary search expects.
func (l *Layout) KernelTable() [MaxBounds]uint64 {
	var t [MaxBounds]uint64
	for i := range t {
		t[i] = math.MaxUint64
	}
	copy(t[:], l.Bounds)
	return t
}

// Slot is the Go twin of ktel_slot() in bpf/headers/ktel_hist.h: the index
// of the first bound >= ns, found with the same fixed-step search.
func (l *Layout) Slot(ns uint64) int {
	t := l.KernelTable()
	k := 0
	for step := MaxBounds / 2; step > 0; step >>= 1 {
		if t[k+step-1] < ns {
			k += step
		}
	}
	return min(k, l.Slots()-1)
}

// FloorBound returns floor(1e9 * 2^(i/2^schema)), the largest whole number
// of nanoseconds n with n <= 2^(i/2^schema) seconds, computed exactly:
// n^(2^schema) * 2^-i <= 1e9^(2^schema) in integers.
func FloorBound(i, schema int) uint64 {
	per := 1 << schema
	guess := uint64(math.Floor(1e9 * math.Exp2(float64(i)/float64(per))))
	for guess > 0 && !withinBound(guess, i, per) {
		guess--
	}
	for withinBound(guess+1, i, per) {
		guess++
	}
	return guess
}

// withinBound reports whether n ns <= 2^(i/per) s, exactly.
func withinBound(n uint64, i, per int) bool {
	lhs := new(big.Int).Exp(new(big.Int).SetUint64(n), big.NewInt(int64(per)), nil)
	rhs := new(big.Int).Exp(big.NewInt(1e9), big.NewInt(int64(per)), nil)
	if i >= 0 {
		rhs.Lsh(rhs, uint(i))
	} else {
		lhs.Lsh(lhs, uint(-i))
	}
	return lhs.Cmp(rhs) <= 0
}

// ClassicBounds are the classic bucket upper bounds in seconds.
func ClassicBounds() []float64 {
	b := make([]float64, 0, ClassicBuckets)
	for e := ClassicMinExp; e <= ClassicMaxExp; e++ {
		b = append(b, math.Ldexp(1, e))
	}
	return b
}

// Classic derives cumulative classic buckets from per-slot counts: the
// count of observations <= each of ClassicBounds(), in that order. Every
// classic bound is a power of two and so a native bound of any schema: the
// derivation is exact.
func (l *Layout) Classic(slots []uint64) []uint64 {
	return l.ClassicInto(make([]uint64, 0, ClassicBuckets), slots)
}

// ClassicInto is Classic appending to out.
func (l *Layout) ClassicInto(out, slots []uint64) []uint64 {
	per := 1 << l.Schema
	var cum uint64
	k := 0
	for e := ClassicMinExp; e <= ClassicMaxExp; e++ {
		// Add slots up to and including the one whose upper bound is 2^e.
		for last := e*per - l.FirstIndex(); k <= last && k < len(slots); k++ {
			cum += slots[k]
		}
		out = append(out, cum)
	}
	return out
}
