package lb

import (
	"fmt"
	"hash/fnv"
	"slices"
)

// MaglevSizes are the accepted Maglev table sizes: primes, as the
// algorithm needs, each about twice the previous. A table should have at
// least 100 entries per backend for each backend's share to be within 1%
// of its weight.
var MaglevSizes = []int{251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521}

// DefaultMaglevSize is the default table size: 4 KiB of kernel memory per
// service, good for up to 10 backends per service.
const DefaultMaglevSize = 1021

// Maglev builds the lookup table of Maglev hashing (Eisenbud et al.,
// NSDI 2016) for backends, with m entries (a prime from MaglevSizes). Each
// entry is an index into backends. A backend's permutation of the table
// depends only on its address, so removing one backend changes only the
// entries that pointed to it (and a few more, far fewer than 1/N), and the
// same backends always give the same table, across restarts too.
//
// Weights are honoured by giving each backend turns in proportion to its
// weight: in each round, the heaviest backends take one turn and lighter
// ones accumulate credit.
func Maglev(backends []Backend, m int) ([]uint32, error) {
	if !slices.Contains(MaglevSizes, m) {
		return nil, fmt.Errorf("maglev table size %d: want one of %v", m, MaglevSizes)
	}
	n := len(backends)
	if n == 0 {
		return nil, nil
	}
	if n > m {
		return nil, fmt.Errorf("%d backends do not fit a maglev table of %d", n, m)
	}
	offset := make([]uint64, n)
	skip := make([]uint64, n)
	next := make([]uint64, n)
	credit := make([]uint32, n)
	var maxW uint32
	for i, b := range backends {
		name := []byte(b.Addr.String())
		offset[i] = hash64(name, 0) % uint64(m)
		skip[i] = hash64(name, 1)%uint64(m-1) + 1
		maxW = max(maxW, weight(b))
	}
	table := make([]uint32, m)
	filled := make([]bool, m)
	for placed := 0; placed < m; {
		for i, b := range backends {
			credit[i] += weight(b)
			if credit[i] < maxW {
				continue
			}
			credit[i] -= maxW
			c := (offset[i] + next[i]*skip[i]) % uint64(m)
			for filled[c] {
				next[i]++
				c = (offset[i] + next[i]*skip[i]) % uint64(m)
			}
			table[c] = uint32(i)
			filled[c] = true
			next[i]++
			if placed++; placed == m {
				break
			}
		}
	}
	return table, nil
}

func weight(b Backend) uint32 { return max(b.Weight, 1) }

func hash64(b []byte, seed byte) uint64 {
	h := fnv.New64a()
	h.Write([]byte{seed})
	h.Write(b)
	return mix(h.Sum64())
}

// mix is the murmur3 finalizer: FNV's low bits are weak for short inputs.
func mix(x uint64) uint64 {
	x ^= x >> 33
	x *= 0xff51afd7ed558ccd
	x ^= x >> 33
	x *= 0xc4ceb9fe1a85ec53
	x ^= x >> 33
	return x
}
