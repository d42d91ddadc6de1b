package lb

import "slices"

// rangeAlloc hands out contiguous ranges of slots, first fit. Freed ranges
// are merged with their neighbours.
type rangeAlloc struct {
	free [][2]uint32 // sorted, disjoint [start, end)
}

func newRangeAlloc(n uint32) *rangeAlloc {
	a := &rangeAlloc{}
	if n > 0 {
		a.free = [][2]uint32{{0, n}}
	}
	return a
}

func (a *rangeAlloc) alloc(n uint32) (uint32, bool) {
	for i, r := range a.free {
		if r[1]-r[0] < n {
			continue
		}
		start := r[0]
		if r[0]+n == r[1] {
			a.free = slices.Delete(a.free, i, i+1)
		} else {
			a.free[i][0] += n
		}
		return start, true
	}
	return 0, false
}

func (a *rangeAlloc) release(start, n uint32) {
	if n == 0 {
		return
	}
	end := start + n
	i, _ := slices.BinarySearchFunc(a.free, start, func(r [2]uint32, s uint32) int { return int(int64(r[0]) - int64(s)) })
	a.free = slices.Insert(a.free, i, [2]uint32{start, end})
	// Merge with the next, then the previous.
	if i+1 < len(a.free) && a.free[i][1] == a.free[i+1][0] {
		a.free[i][1] = a.free[i+1][1]
		a.free = slices.Delete(a.free, i+1, i+2)
	}
	if i > 0 && a.free[i-1][1] == a.free[i][0] {
		a.free[i-1][1] = a.free[i][1]
		a.free = slices.Delete(a.free, i, i+1)
	}
}

func (a *rangeAlloc) available() uint32 {
	var n uint32
	for _, r := range a.free {
		n += r[1] - r[0]
	}
	return n
}

// idAlloc hands out indexes 0..limit-1, reusing released ones first.
type idAlloc struct {
	next, limit uint32
	free        []uint32
}

func (a *idAlloc) get() (uint32, bool) {
	if n := len(a.free); n > 0 {
		id := a.free[n-1]
		a.free = a.free[:n-1]
		return id, true
	}
	if a.next >= a.limit {
		return 0, false
	}
	a.next++
	return a.next - 1, true
}

func (a *idAlloc) put(id uint32) { a.free = append(a.free, id) }

func (a *idAlloc) inUse() int { return int(a.next) - len(a.free) }
